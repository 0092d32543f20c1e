"""Real servers: a site that starts from a local MONAI bundle, label maps with more classes, the start-up
sweep, and partners whose task differs (swapped label order) refusing each other before any download."""

import pytest
import requests
import SimpleITK as sitk
import torch
import yaml
from helpers import make_studies, running, train, write_config, write_federation
from monai.networks import nets
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from gcml_app.config import load_config
from gcml_app.federation.state import GossipState
from gcml_app.ml.bundle import write_bundle
from gcml_app.site.client import SiteClient
from gcml_app.site.launch import SiteServer
from gcml_app.store import ModelStore

pytestmark = pytest.mark.slow

NET_DEFS = {  # the bundles' networks: a UNet with batch norm (the spleen bundle's kind) and a SegResNet
    "UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2],
             "num_res_units": 1, "norm": "batch"},
    "SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_filters": 8, "blocks_down": [1, 1, 1],
                  "blocks_up": [1, 1]},
}


@pytest.mark.parametrize("kind", sorted(NET_DEFS))
def test_a_site_starts_from_a_bundle_serves_only_after_validation_and_sweeps_crash_leftovers(tmp_path, kind):
    torch.manual_seed(5)
    net = getattr(nets, kind)(**NET_DEFS[kind])
    bundle = write_bundle(tmp_path / "spleenish", {"_target_": kind, **NET_DEFS[kind]}, net.state_dict(),
                          name="test spleen-like", version="0.5.1")
    studies, _ = make_studies(tmp_path, cases=8, labelled=6)
    first = studies / "labels" / "final" / "case_000.nii.gz"  # a label map with a class the task does not train
    lab = sitk.ReadImage(str(first))
    arr = sitk.GetArrayFromImage(lab)
    arr[:2] = 9
    extra = sitk.GetImageFromArray(arr)
    extra.CopyInformation(lab)
    sitk.WriteImage(extra, str(first))
    stored = first.read_bytes()
    config = write_config(tmp_path, network={"name": "bundle", "init_from": str(bundle)},
                          labels={"organ": 1, "lesion": 2, "other_values": "background"})
    cfg = load_config(config)
    spool = GossipState(cfg.state_dir).cache / ".pull-site-b.x1y2.safetensors"  # a pull killed mid-transfer
    spool.write_bytes(b"\0" * 4096)
    with SiteServer(config, studies, log=tmp_path / "server.log") as server:
        client, site = MONAILabelClient(server.url), SiteClient(server.url)
        assert not spool.exists()
        status = site.status()
        assert status["served"] is None and status["disk"]["models"]["keep_versions"] == 10
        with pytest.raises(MONAILabelClientException, match="no trained model yet"):
            client.infer("gcml_seg", "case_006", {})
        done = train(client, epochs=1)
        assert done["status"] == "DONE", done.get("details")
        served = site.status()["served"]
        assert served["version"] == 1 and served["val_dice"] and served["n_train"] + served["n_val"] == 6
        assert served["start"]["bundle"] == "test spleen-like" and served["start"]["bundle_version"] == "0.5.1"
        assert served["lineage"][-1]["mode"] == "init" and served["lineage"][-1]["bundle"] == "test spleen-like"
        _, params = client.infer("gcml_seg", "case_006", {})
        assert params["gcml_model_version"] == 1
        assert first.read_bytes() == stored  # the extra class was read as background; the file is as it was


def _rewrite(config, **keys):
    raw = yaml.safe_load(config.read_text())
    raw.update(keys)
    config.write_text(yaml.safe_dump(raw))


def test_partners_with_swapped_label_order_refuse_each_other_before_any_download(tmp_path):
    sites = write_federation(tmp_path, styles="ab", cases=6, labelled=5)
    _rewrite(sites["site-b"]["config"], labels={"lesion": 1, "organ": 2})
    with running(sites, tmp_path):
        a, b = (SiteClient(sites[n]["url"]) for n in ("site-a", "site-b"))
        stores = {n: ModelStore(load_config(s["config"]).state_dir / "models") for n, s in sites.items()}
        for site, peer in ((b, "site-a"), (a, "site-b")):
            assert site.round(peers=[peer])["stage"] == "warmup"  # a site's first round trains alone
        rec = a.round(peers=["site-b"])
        attempt = rec["gossip"]["attempts"][0]
        assert attempt["outcome"] == "rejected" and attempt.get("bytes", 0) == 0
        assert attempt["reason"] == "task differs: labels: ours [organ, lesion], site-b [lesion, organ]"
        served = stores["site-a"].served_version()
        before = stores["site-a"].read_bytes(served)
        rec = a.round(peers=["site-b"])
        assert rec["gossip"]["attempts"][0]["outcome"] == "rejected"
        assert stores["site-a"].served_version() == served and stores["site-a"].read_bytes(served) == before
        assert not GossipState(load_config(sites["site-a"]["config"]).state_dir).cached_model("site-b").exists()
        row = next(r for r in a.status()["partners"] if r["name"] == "site-b")
        assert "labels: ours [organ, lesion], site-b [lesion, organ]" in row["last_error"]
        rec = b.round(peers=["site-a"])
        assert rec["gossip"]["attempts"][0]["reason"] == "task differs: labels: ours [lesion, organ], site-a [organ, lesion]"


def test_a_site_prunes_old_versions_and_every_rollback_target_stays(tmp_path):
    studies, _ = make_studies(tmp_path, cases=6, labelled=5)
    config = write_config(tmp_path, validation={"fraction": 0.2, "min_cases": 1, "gate": False},  # publish each round
                          store={"keep_versions": 1})
    with SiteServer(config, studies, log=tmp_path / "server.log") as server:
        client, site = MONAILabelClient(server.url), SiteClient(server.url)
        for _ in range(4):
            assert train(client, epochs=1)["status"] == "DONE"
        status = site.status()
        # served v4, its ancestor v3, and the first: the rest freed
        assert status["versions"] == [1, 3, 4] and status["served"]["version"] == 4
        store = ModelStore(load_config(config).state_dir / "models")
        assert not (store.root / "v000002.safetensors").exists()
        for v in (3, 1):
            r = requests.post(f"{server.url}/gcml/rollback/{v}", timeout=30)
            assert r.status_code == 200, r.text
        r = requests.post(f"{server.url}/gcml/rollback/2", timeout=30)
        assert r.status_code == 404 and "version 2 does not exist; known versions: [1, 3, 4]" in r.json()["detail"]
        assert site.status()["disk"]["models"]["versions"] == 3
