"""A site on a real PACS: Orthanc 1.10 with its DICOMweb plugin on a free loopback port, authentication on.

The datastore is driven in-process for the fault cases, and a real MONAI Label server on Orthanc is
driven with ``monailabel.client`` (the calls the Slicer module makes) for the whole loop: next sample,
inference, a Slicer-ordered label that becomes a DICOM SEG in Orthanc, training, gossip with a folder
site, and Orthanc stopped mid-session.
"""

import logging
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import train, write_federation
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from gcml_app.config import load_config
from gcml_app.errors import LabelRejected
from gcml_app.sim.phantoms import LABELS, STYLES, make_case, write_dicom_studies
from gcml_app.site.client import SiteClient
from gcml_app.site.dicom import write_series
from gcml_app.site.launch import SiteServer
from gcml_app.site.orthanc import Orthanc
from gcml_app.site.dicomweb import pacs_client, stow_folder
from gcml_app.site.pacs import PacsDatastore, PacsUnavailable
from gcml_app.store import ModelStore

CASES, LABELLED = 8, 4


def _series_uid(folder):
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def dicom(tmp_path_factory):
    """Sample phantoms as DICOM: ``{"dir", "uids": [series UID per case], "labelled": [the first LABELLED]}``."""
    out = write_dicom_studies(tmp_path_factory.mktemp("dicom") / "dicom", "a", cases=CASES, labelled=LABELLED)
    uids = [_series_uid(out / f"case_{i:03d}") for i in range(CASES)]
    return {"dir": out, "uids": uids, "labelled": uids[:LABELLED], "truth": out}


@pytest.fixture
def pacs(tmp_path, dicom):
    """A fresh Orthanc holding the sample series and SEGs."""
    with Orthanc(tmp_path / "orthanc") as orthanc:
        assert stow_folder(dicom["dir"], pacs_client(orthanc.url, auth=orthanc.auth)) == CASES * 32 + LABELLED
        yield orthanc


def _datastore(orthanc, tmp_path, auth=None):
    return PacsDatastore(pacs_client(orthanc.url, auth=auth or orthanc.auth), LABELS, cache_path=tmp_path / "cache",
                         search_filter={"Modality": "CT"})


def _segs(orthanc):
    """Every DICOM SEG in Orthanc: ``{SEG series UID: referenced series UID}`` (QIDO, then metadata)."""
    client = pacs_client(orthanc.url, auth=orthanc.auth)
    out = {}
    for d in client.search_for_series(search_filters={"Modality": "SEG"}):
        meta = pydicom.Dataset.from_json(client.retrieve_series_metadata(d["0020000D"]["Value"][0],
                                                                          d["0020000E"]["Value"][0])[0])
        out[str(meta.SeriesInstanceUID)] = str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return out


def test_pacs_series_are_cases_and_its_segs_are_final_labels(pacs, dicom, tmp_path):
    ds = _datastore(pacs, tmp_path)
    assert sorted(ds.list_images()) == sorted(dicom["uids"])
    assert sorted(ds.get_labeled_images("final")) == sorted(dicom["labelled"])
    for uid in dicom["labelled"]:  # each SEG became a label in the image's geometry, remapped by name
        image, label = sitk.ReadImage(ds.get_image_uri(uid)), sitk.ReadImage(ds.get_label_uri(uid, "final"))
        assert label.GetSize() == image.GetSize() and np.allclose(label.GetOrigin(), image.GetOrigin())
        assert set(np.unique(sitk.GetArrayFromImage(label)).tolist()) == {0, 1, 2}
    assert sorted(ds.get_unlabeled_images()) == sorted(dicom["uids"][LABELLED:])
    assert ds.status() == {"total": CASES, "completed": LABELLED, "label_tags": {"final": LABELLED}}
    status = ds.pacs_status()
    assert status["reachable"] and status["cached_series"] == LABELLED and status["skipped"] == {}
    # ids are DICOM UIDs: nothing else reaches a path or the PACS
    assert ds.get_image_uri("../../etc/passwd") == "" and ds.get_image_uri("1.2.3" * 30) == ""


def _bad_series(folder, corrupt):
    img, _ = make_case(STYLES["a"], np.random.default_rng(7), shape=(8, 16, 16))
    uid = write_series(sitk.GetImageFromArray(img), folder)
    corrupt(sorted(folder.iterdir()))
    return uid


def _missing_slice(files):
    files[4].unlink()


def _mixed_orientation(files):
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(files[2])


def _not_an_image(files):
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        ds.save_as(f)


@pytest.mark.parametrize("corrupt,reason", [
    (_missing_slice, "not evenly spaced (a missing slice?)"),
    (_mixed_orientation, "mixed orientation"),
    (_not_an_image, "SOP class 1.2.840.10008.5.1.4.1.1.7 is not a single-frame image class"),
], ids=["missing-slice", "mixed-orientation", "non-image-sop-class"])
def test_unusable_series_in_the_pacs_is_skipped_with_its_reason(pacs, dicom, tmp_path, corrupt, reason, caplog):
    uid = _bad_series(tmp_path / "bad", corrupt)
    stow_folder(tmp_path / "bad", pacs_client(pacs.url, auth=pacs.auth))
    ds = _datastore(pacs, tmp_path)
    assert uid in ds.list_images()
    with caplog.at_level(logging.WARNING, logger="gcml_app.site.pacs"):
        assert ds.get_image_uri(uid) == ""
    assert reason in ds.skipped()[uid] and reason in ds.pacs_status()["skipped"][uid]
    assert any(uid in r.message and reason in r.message for r in caplog.records)
    assert uid not in ds.list_images() and uid not in ds.get_unlabeled_images()
    assert not (ds.cache / uid).exists()  # the downloaded instances are not kept
    assert sorted(ds.get_labeled_images("final")) == sorted(dicom["labelled"])  # the rest still trains


def _foreign_segment(seg):
    seg.SegmentSequence[0].SegmentLabel = "liver"


def _no_pixels(seg):
    del seg.PixelData


@pytest.mark.parametrize("corrupt,reason", [
    (_foreign_segment, "segment 'liver' is not a task label"),
    (_no_pixels, "DICOM SEG unusable: "),
], ids=["foreign-segment", "no-pixel-data"])
def test_unusable_seg_in_the_pacs_is_skipped_and_the_rest_still_trains(pacs, dicom, tmp_path, corrupt, reason):
    seg = pydicom.dcmread(dicom["dir"] / "case_000_seg.dcm")
    seg.SeriesInstanceUID, seg.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    ref.SeriesInstanceUID = dicom["uids"][-1]  # an unlabelled case
    corrupt(seg)
    pacs_client(pacs.url, auth=pacs.auth).store_instances([seg])
    ds = _datastore(pacs, tmp_path)
    assert sorted(ds.get_labeled_images("final")) == sorted(dicom["labelled"])
    assert reason in ds.skipped()[seg.SeriesInstanceUID]


def test_pacs_down_the_cache_keeps_serving_and_errors_name_the_url(pacs, dicom, tmp_path, caplog):
    ds = _datastore(pacs, tmp_path)
    assert len(ds.get_labeled_images("final")) == LABELLED
    uncached = dicom["uids"][-1]
    pacs.stop()
    with caplog.at_level(logging.ERROR, logger="gcml_app.site.pacs"):
        ds._listing = None  # the listing is reused for LIST_TTL_S; ask the PACS now
        assert sorted(ds.list_images()) == sorted(dicom["labelled"])  # the cached series
        assert ds.list_images() == ds.list_images()
    errors = [r.message for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and pacs.url in errors[0] and f"serving the {LABELLED} cached series" in errors[0]
    assert ds.get_image_uri(dicom["labelled"][0]).endswith(".nii.gz")  # cached: no PACS needed
    assert sorted(ds.get_labeled_images("final")) == sorted(dicom["labelled"])
    with pytest.raises(PacsUnavailable, match=f"PACS {pacs.url} is unreachable"):
        ds.get_image_uri(uncached)
    status = ds.pacs_status()
    assert status["reachable"] is False and "connection failed" in status["last_error"]
    assert pacs.password not in str(status)


def test_pacs_with_wrong_credentials_is_refused_clearly(pacs, dicom, tmp_path):
    ds = _datastore(pacs, tmp_path, auth=(pacs.user, "wrong-password"))
    assert ds.list_images() == []
    with pytest.raises(PacsUnavailable, match="QIDO series: HTTP 401"):
        ds.get_image_uri(dicom["uids"][0])


def test_credentials_belong_in_the_environment_not_the_url():
    with pytest.raises(ValueError, match=r"PACS URL http://pacs.example/dicom-web carries credentials; set "
                                         r"MONAI_LABEL_DATASTORE_USERNAME") as e:
        pacs_client("http://gcml:hunter2@pacs.example/dicom-web")
    assert "hunter2" not in str(e.value)


def _slicer_upload(tmp_path, image_path, truth, name="upload.nii.gz"):
    """A label as Slicer sends it: segments numbered in segment order (lesion first), names in label_info."""
    image = sitk.ReadImage(str(image_path))
    up = sitk.GetImageFromArray(np.select([truth == 2, truth == 1], [1, 2], 0).astype(np.uint8))
    up.CopyInformation(image)
    sitk.WriteImage(up, str(tmp_path / name))
    return tmp_path / name, {"label_info": [{"name": "lesion", "idx": 1}, {"name": "organ", "idx": 2}]}


def _truth(dicom, uid):
    """The phantom label of a case, from a SEG-less case: regenerate it the way the sample data did."""
    from gcml_app.sim.phantoms import write_studies

    folder = dicom["dir"].parent / "nifti"
    if not folder.exists():
        write_studies(folder, "a", cases=CASES, labelled=CASES)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels" / "final" /
                                                     f"case_{dicom['uids'].index(uid):03d}.nii.gz")))


def test_label_saved_while_the_pacs_is_down_is_refused_and_nothing_is_stored(pacs, dicom, tmp_path):
    ds = _datastore(pacs, tmp_path)
    uid = dicom["uids"][-1]
    image = ds.get_image_uri(uid)
    upload, info = _slicer_upload(tmp_path, image, _truth(dicom, uid))
    pacs.stop()
    with pytest.raises(PacsUnavailable, match=f"PACS {pacs.url} is unreachable \\(STOW SEG: connection failed\\)"):
        ds.save_label(uid, str(upload), "final", info)
    assert ds.get_label_uri(uid, "final") == "" and uid not in ds.get_labeled_images("final")


def test_wrong_geometry_is_refused_before_the_pacs_sees_it(pacs, dicom, tmp_path):
    ds = _datastore(pacs, tmp_path)
    uid = dicom["uids"][-1]
    image = sitk.ReadImage(ds.get_image_uri(uid))
    bad = sitk.GetImageFromArray(np.ones((32, 32, 31), np.uint8))
    bad.SetSpacing(image.GetSpacing())
    sitk.WriteImage(bad, str(tmp_path / "bad.nii.gz"))
    before = _segs(pacs)
    with pytest.raises(LabelRejected, match="shape"):
        ds.save_label(uid, str(tmp_path / "bad.nii.gz"), "final", {})
    assert _segs(pacs) == before and ds.get_label_uri(uid, "final") == ""


# --------------------------------------------------------------------------- a real server on Orthanc

@pytest.mark.slow
def test_site_on_orthanc_serves_labels_trains_gossips_and_survives_the_pacs_going_down(
        pacs, dicom, tmp_path, capsys):
    # scoring on request only: a background run would hold the scoring task when the test asks for one
    fed = write_federation(tmp_path / "fed", styles="ab", cases=6, labelled=5, active={"poll_s": 0})
    a, b = fed["site-a"], fed["site-b"]
    store_a = ModelStore(load_config(a["config"]).state_dir / "models")
    with SiteServer(a["config"], pacs.url, port=a["port"], log=tmp_path / "a.log", env=pacs.env) as srv_a, \
            SiteServer(b["config"], b["studies"], port=b["port"], log=tmp_path / "b.log"):
        client = MONAILabelClient(srv_a.url)
        info = client.info()
        assert info["labels"] == LABELS and info["datastore"]["total"] == CASES
        assert info["datastore"]["completed"] == 0  # /info fetches nothing; the first round fills the cache

        # A training round on PACS data: the first fills the cache from Orthanc (series and SEGs).
        t0 = time.perf_counter()
        status = train(client, epochs=2)
        first_round_s = time.perf_counter() - t0
        assert status["status"] == "DONE", status.get("details")
        assert store_a.served_version() == 1
        rec = store_a.history()[-1]
        assert rec["n_train"] + rec["n_val"] == LABELLED

        sample = client.next_sample("random", {})
        assert sample["id"] in dicom["uids"][LABELLED:]  # a series UID without a SEG
        prediction, params = client.infer("gcml_seg", sample["id"], {})
        assert params["gcml_model_version"] == 1 and sitk.ReadImage(prediction).GetSize() == (32, 32, 32)

        # Slicer-ordered upload -> a DICOM SEG in Orthanc referencing the series, and a final label
        cache = srv_a.session.get(srv_a.url + "/gcml/status", timeout=10).json()["pacs"]["cache"]
        image = f"{cache}/{sample['id']}.nii.gz"
        truth = _truth(dicom, sample["id"])
        upload, info = _slicer_upload(tmp_path, image, truth)
        before = _segs(pacs)
        assert client.save_label(sample["id"], str(upload), "final", info)["label"] == sample["id"]
        new = {k: v for k, v in _segs(pacs).items() if k not in before}
        assert list(new.values()) == [sample["id"]]
        stored = sitk.GetArrayFromImage(sitk.ReadImage(f"{cache}/labels/final/{sample['id']}.nii.gz"))
        assert np.array_equal(stored, truth)  # remapped by name

        # A label with the wrong geometry: 422, and nothing new in Orthanc
        other = next(u for u in dicom["uids"][LABELLED:] if u != sample["id"])
        bad = sitk.GetImageFromArray(np.ones((30, 32, 32), np.uint8))
        sitk.WriteImage(bad, str(tmp_path / "bad.nii.gz"))
        with pytest.raises(MONAILabelClientException) as e:
            client.save_label(other, str(tmp_path / "bad.nii.gz"), "final", {})
        assert "Status: 422" in e.value.msg and "shape" in e.value.msg
        assert len(_segs(pacs)) == len(before) + 1

        # A second round (second pass over the cache) uses the new label; then inference with its version
        t0 = time.perf_counter()
        status = train(client, epochs=2)
        second_round_s = time.perf_counter() - t0
        assert status["status"] == "DONE", status.get("details")
        rec = store_a.history()[-1]
        assert rec["n_train"] + rec["n_val"] == LABELLED + 1
        _, params = client.infer("gcml_seg", sample["id"], {})
        assert params["gcml_model_version"] == store_a.served_version()

        # Gossip between the PACS site and the folder site, both ways
        site_a, site_b = SiteClient(srv_a.url), SiteClient(b["url"])
        assert site_b.round()["stage"] == "warmup"
        rec = site_a.round(peers=["site-b"])
        assert rec["event"] in ("publish", "keep") and rec["gossip"]["peer"] == "site-b"
        assert rec["gossip"]["bytes_pulled"] > 0
        rec = site_b.round(peers=["site-a"])
        assert rec["event"] in ("publish", "keep") and rec["gossip"]["bytes_pulled"] > 0

        # Scores for Next Sample: the cached series without a label only; nothing is fetched to score it
        cached_before = sorted(p.name for p in Path(cache).glob("*.nii.gz"))
        answer = srv_a.session.post(srv_a.url + "/scoring/disagreement?run_sync=true", json={}, timeout=300)
        assert answer.status_code == 200, answer.text
        run = answer.json()
        assert run["partners"] == ["site-b"] and run["scored"] == run["unlabelled"] == 1
        assert sorted(p.name for p in Path(cache).glob("*.nii.gz")) == cached_before
        active = srv_a.session.get(srv_a.url + "/gcml/status", timeout=10).json()["active"]
        assert active["unlabelled"] == 1 and active["disagreement"]["current"] == 1
        assert [t["id"] for t in active["disagreement"]["top"]] == [other]
        assert client.next_sample("disagreement", {})["id"] == other

        # Orthanc stops mid-session: /info and inference on cached series still answer; an uncached
        # series gets a clear 503 naming the PACS.
        pacs.stop()
        uncached = next(u for u in dicom["uids"][LABELLED:] if u not in (sample["id"], other))
        with pytest.raises(MONAILabelClientException) as e:
            client.infer("gcml_seg", uncached, {})
        assert "Status: 503" in e.value.msg and f"PACS {pacs.url} is unreachable" in e.value.msg
        # once the PACS is known down, listings are the cache's: labelled, sample and other
        assert client.info()["datastore"]["total"] == LABELLED + 2
        assert client.next_sample("random", {})["id"] == other  # the only cached series without a label
        _, params = client.infer("gcml_seg", sample["id"], {})
        assert params["gcml_model_version"] == store_a.served_version()
        status = srv_a.session.get(srv_a.url + "/gcml/status", timeout=10).json()["pacs"]
        assert status["reachable"] is False and status["url"] == pacs.url
        log = (tmp_path / "a.log").read_text()
        assert f"PACS {pacs.url} is unreachable" in log and pacs.password not in log
        with capsys.disabled():
            print(f"\n[pacs] first round (cache fill from Orthanc + 2 epochs) {first_round_s:.1f} s; "
                  f"second round {second_round_s:.1f} s")


def test_the_cache_bound_evicts_instances_then_unlabelled_volumes_and_never_labels(pacs, dicom, tmp_path):
    from pathlib import Path

    from gcml_app.site.disk import folder_bytes

    ds = _datastore(pacs, tmp_path)
    labelled, unlabelled = dicom["labelled"], dicom["uids"][LABELLED:LABELLED + 3]
    assert sorted(ds.get_labeled_images("final")) == sorted(labelled)
    order = [*labelled, *unlabelled]
    for uid in order:  # use every series once, in this order: the first is the least recently used
        ds.get_image_uri(uid)
        time.sleep(0.01)
    assert all((ds.cache / uid).is_dir() for uid in order)
    oldest = folder_bytes(ds.cache / order[0])
    out = ds.evict(folder_bytes(ds.cache) - oldest + 1)  # room for all but one series' instances
    assert out == {"evicted_instances": [order[0]], "evicted_volumes": [], "bytes": out["bytes"]}
    out = ds.evict(0)  # nothing may stay that can be fetched again
    assert sorted(out["evicted_instances"]) == sorted(order[1:]) and sorted(out["evicted_volumes"]) == sorted(unlabelled)
    for uid in labelled:  # what rounds train on stays: volume and label
        assert Path(ds.get_image_uri(uid)).is_file() and Path(ds.get_label_uri(uid, "final")).is_file()
    assert sorted(ds.get_labeled_images("final")) == sorted(labelled)
    again = ds.get_image_uri(unlabelled[0])  # an evicted series is fetched again on use
    assert Path(again).is_file() and (ds.cache / unlabelled[0]).is_dir()
    bounded = PacsDatastore(pacs_client(pacs.url, auth=pacs.auth), LABELS, cache_path=tmp_path / "cache",
                            search_filter={"Modality": "CT"}, max_cache_bytes=1)
    bounded.get_image_uri(unlabelled[1])  # a fetch evicts down to the bound, except what it fetched
    assert Path(bounded.get_image_uri(unlabelled[1])).is_file() and not (bounded.cache / unlabelled[0]).exists()
