"""A real MONAI Label server with this app on a free loopback port, driven like 3D Slicer drives it."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from helpers import make_studies, train, write_config
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from gcml_app.config import load_config
from gcml_app.site.client import ParamsClient
from gcml_app.site.launch import SiteServer
from gcml_app.store import ModelStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    studies, truth = make_studies(root, cases=9, labelled=5)
    config = write_config(root)
    with SiteServer(config, studies, log=root / "server.log") as server:
        yield {
            "client": MONAILabelClient(server.url),
            "url": server.url,
            "cfg": load_config(config),
            "studies": studies,
            "truth": truth,
            "log": root / "server.log",
        }


def read(path):
    return sitk.ReadImage(str(path))


def test_slicer_loop_trains_serves_and_picks_up_new_versions(site, tmp_path):
    client, cfg, studies = site["client"], site["cfg"], site["studies"]
    store = ModelStore(cfg.state_dir / "models")

    info = client.info()
    assert "gcml_seg" in info["models"] and "gcml" in info["trainers"]
    assert {"first", "random"} <= set(info["strategies"])
    assert info["labels"] == {"organ": 1, "lesion": 2}
    assert "config" not in info  # Slicer breaks on a top-level config key

    sample = client.next_sample("first", {})
    assert sample["id"] == "case_005"  # the first case without a final label

    with pytest.raises(MONAILabelClientException) as e:
        client.infer("gcml_seg", sample["id"], {})
    assert "Status: 409" in e.value.msg and "no trained model yet" in e.value.msg

    status = train(client, epochs=1)
    assert status["status"] == "DONE", status.get("details")
    assert store.served_version() == 1
    stats = client.info()["train_stats"]["gcml"]
    assert stats["served_version"] == 1 and stats["epoch"] == stats["total_epochs"] == 1 and "total_time" in stats

    label_file, params = client.infer("gcml_seg", sample["id"], {})
    image = read(studies / f"{sample['id']}.nii.gz")
    pred = read(label_file)
    assert pred.GetSize() == image.GetSize()
    assert np.allclose(pred.GetSpacing(), image.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2}
    assert params["gcml_model_version"] == 1

    # Submit a corrected label the way Slicer does: segments 1..n in segment order, names in label_info.
    truth = sitk.GetArrayFromImage(read(site["truth"] / f"{sample['id']}.nii.gz"))
    slicer_arr = np.select([truth == 2, truth == 1], [1, 2], 0).astype(np.uint8)  # lesion first, organ second
    slicer_img = sitk.GetImageFromArray(slicer_arr)
    slicer_img.CopyInformation(image)
    upload = tmp_path / "upload.nii.gz"
    sitk.WriteImage(slicer_img, str(upload))
    res = client.save_label(sample["id"], str(upload), "final",
                            {"label_info": [{"name": "lesion", "idx": 1}, {"name": "organ", "idx": 2}]})
    assert res["label"] == sample["id"]
    stored = sitk.GetArrayFromImage(read(studies / "labels" / "final" / f"{sample['id']}.nii.gz"))
    assert np.array_equal(stored, truth)  # remapped to the task's indices by name
    assert client.next_sample("first", {})["id"] == "case_006"

    status = train(client, epochs=30)
    assert status["status"] == "DONE", status.get("details")
    assert store.served_version() == 2, store.history()[-1]
    last = store.history()[-1]
    assert last["event"] == "publish" and last["mean"]["local"] > last["mean"]["served"]
    assert store.served().n_train + store.served().n_val == 6

    _, params = client.infer("gcml_seg", sample["id"], {})
    assert params["gcml_model_version"] == 2  # new version served without a restart

    store.rollback(1, reason="test")
    _, params = client.infer("gcml_seg", sample["id"], {})
    assert params["gcml_model_version"] == 1

    # A DCML round through the same train task, with an incoming model file in the state folder.
    incoming = cfg.state_dir / "peers" / "partner.safetensors"
    incoming.parent.mkdir(exist_ok=True)
    incoming.write_bytes(store.read_bytes(2))
    status = train(client, epochs=2, mode="dcml", incoming=str(incoming))
    assert status["status"] == "DONE", status.get("details")
    last = store.history()[-1]
    assert last["mode"] == "dcml" and set(last["scores"]) == {"served", "dcml_local", "dcml_incoming", "average"}
    assert client.info()["train_stats"]["gcml"]["last_round"]["mode"] == "dcml"

    status = train(client, epochs=1, mode="dcml", incoming="/etc/passwd")
    assert status["status"] == "ERROR"
    assert any("incoming model /etc/passwd rejected: expected a file inside" in line for line in status["details"])

    # A state file damaged outside the app: the internal surface says what failed, not a bare 500.
    pointer = cfg.state_dir / "models" / "served.json"
    saved = pointer.read_bytes()
    pointer.write_text("{not json")
    try:
        r = requests.get(f"{site['url']}/gcml/status", timeout=30)
        assert r.status_code == 500 and r.json()["detail"].startswith("internal error: JSONDecodeError: ")
    finally:
        pointer.write_bytes(saved)


def test_a_params_client_reads_the_answer_and_keeps_no_file(site, tmp_path):
    # After the Slicer loop above: a model is served. The stock client keeps every result it saves.
    kept, _ = MONAILabelClient(site["url"], tmpdir=str(tmp_path)).infer("gcml_seg", "case_000", {})
    assert Path(kept).parent == tmp_path and Path(kept).is_file()
    client = ParamsClient(site["url"])
    folder = Path(client._tmpdir)
    path, params = client.infer("gcml_seg", "case_000", {})
    assert path is None and params["gcml_model_version"] >= 1
    assert folder.is_dir() and folder != Path(tempfile.gettempdir()) and not list(folder.iterdir())


def _snapshot(studies):
    files = {p.relative_to(studies): p.read_bytes() for p in (studies / "labels").rglob("*") if p.is_file()}
    return files, json.loads((studies / "datastore_v2.json").read_text())["objects"]["case_008"]


def _label(tmp_path, image, arr=None, spacing=None, size=None):
    size = size or image.GetSize()
    arr = np.zeros(size[::-1], np.uint8) if arr is None else arr
    lab = sitk.GetImageFromArray(arr)
    lab.SetSpacing(spacing or image.GetSpacing())
    lab.SetOrigin(image.GetOrigin())
    path = tmp_path / "bad.nii.gz"
    sitk.WriteImage(lab, str(path))
    return path


BAD_UPLOADS = [
    # (label builder kwargs, params, expected message in the 422 body)
    ({"size": (32, 32, 30)}, {}, "label shape (32, 32, 30) does not match image shape (32, 32, 32)"),
    ({"spacing": (1.0, 1.0, 3.0)}, {}, "label spacing (1, 1, 3) mm does not match image spacing (1, 1, 1) mm"),
    ({"arr": np.full((32, 32, 32), 7, np.uint8)}, {}, "label values [7] are not task labels"),
    ({"arr": np.ones((32, 32, 32), np.uint8)}, {"label_info": [{"name": "liver", "idx": 1}]},
     "segment 'liver' (value 1) is not a label of this task"),
]


@pytest.mark.parametrize("kwargs, params, message", BAD_UPLOADS)
def test_bad_label_upload_is_rejected_and_datastore_unchanged(site, tmp_path, kwargs, params, message):
    client, studies = site["client"], site["studies"]
    image = read(studies / "case_008.nii.gz")
    before = _snapshot(studies)
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label("case_008", str(_label(tmp_path, image, **kwargs)), "final", params)
    assert "Status: 422" in e.value.msg and message in e.value.msg
    assert _snapshot(studies) == before
    assert "case_008" not in client.datastore()["objects"] or "final" not in client.datastore()["objects"]["case_008"]["labels"]


def test_label_for_unknown_image_and_unsafe_tag(site, tmp_path):
    client, studies = site["client"], site["studies"]
    path = _label(tmp_path, read(studies / "case_008.nii.gz"))
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label("no_such_case", str(path), "final", {})
    assert "Status: 422" in e.value.msg and "image 'no_such_case' is not in the datastore" in e.value.msg
    with pytest.raises(MONAILabelClientException) as e:
        client.save_label("case_008", str(path), "../../../tmp", {})
    assert "Status: 422" in e.value.msg and "label tag '../../../tmp' rejected" in e.value.msg
