"""Next Sample ranked by disagreement on real MONAI Label servers: a site with two real partners, scores
kept current by the scoring watcher in MONAI Label's scoring subprocess, and the stock client
(``monailabel.client``, as Slicer calls it) asking for cases."""

from __future__ import annotations

import pytest
import requests
from helpers import running, until, write_federation
from monailabel.client import MONAILabelClient

from gcml_app.site.client import SiteClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("active")
    # 8 images, 5 labelled: 3 unlabelled per site; scores are looked after every second; every round
    # publishes (no gate), so each partner round is a new served version
    # the top case first (active.selection: top), so that what Next Sample hands out is known
    sites = write_federation(root, cases=8, labelled=5, active={"poll_s": 1.0, "selection": "top"},
                             validation={"fraction": 0.2, "min_cases": 1, "gate": False})
    with running(sites, root) as servers:
        for n, s in sites.items():
            s["site"], s["client"], s["server"] = SiteClient(s["url"]), MONAILabelClient(s["url"]), servers[n]
        yield sites


def _active(site):
    return site["site"].status()["active"]


def test_before_any_model_next_sample_falls_back_to_random(fed):
    a = fed["site-a"]
    assert _active(a)["served_version"] is None
    sample = a["client"].next_sample("disagreement", {})
    unlabelled = set(requests.get(a["url"] + "/datastore/?output=all", timeout=10).json()["objects"]) - {
        p.name.split(".")[0] for p in (a["studies"] / "labels" / "final").glob("*.nii.gz")}
    assert sample["id"] in unlabelled and sample["gcml_fallback"].startswith("random")
    a["handed_out"] = [sample["id"]]  # reserved for the next hour, like any case this strategy hands out


def test_scores_from_two_partners_rank_next_sample_and_show_in_status_info_and_image_info(fed):
    a = fed["site-a"]
    for s in fed.values():
        assert s["site"].round()["event"] == "publish"  # each site's warm-up
    a["site"].round(peers=["site-b"])
    a["site"].round(peers=["site-c"])  # both partner models are now cached at site-a

    def scored():
        act = _active(a)
        d = act["disagreement"]
        return act if set(act["partners"]) == {"site-b", "site-c"} and d["current"] == 3 and d["stale"] == 0 else None

    act = until(scored, timeout=240, what="disagreement scores for every unlabelled image from both partners")
    run = act["disagreement"]["last_run"]
    assert run["partners"] == ["site-b", "site-c"] and run["served_version"] == act["served_version"]
    top = act["disagreement"]["top"]
    assert len(top) == 3 and [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert all(set(t["partners"]) == {"site-b", "site-c"} for t in top)

    info = a["client"].info()
    # offered in the stock module's box; random stays its default (it measured at least as well)
    assert list(info["strategies"])[0] == "random" and {"disagreement", "epistemic"} <= set(info["strategies"])
    assert {"disagreement", "epistemic"} <= set(info["scoring"])

    free = [t for t in top if t["id"] not in a["handed_out"]]
    sample = a["client"].next_sample("disagreement", {})  # what Slicer's Next Sample sends
    assert sample["id"] == free[0]["id"] and "gcml_fallback" not in sample
    d = sample["gcml_disagreement"]
    assert d["score"] == free[0]["score"] and set(d["partners"]) == {"site-b", "site-c"}
    assert d["served_version"] == act["served_version"] and set(d["competence"]) == {"site-b", "site-c"}
    # the next one: the top case is reserved for the annotator who got it
    assert a["client"].next_sample("disagreement", {})["id"] == free[1]["id"]

    image_info = requests.get(a["url"] + "/datastore/image/info", params={"image": free[0]["id"]}, timeout=10).json()
    assert image_info["gcml_disagreement"]["served_version"] == act["served_version"]
    labelled = requests.get(a["url"] + "/datastore/image/info", params={"image": "case_000"}, timeout=10).json()
    assert "gcml_disagreement" not in labelled

    until(lambda: _active(a)["epistemic"]["current"] == 3, timeout=240, what="epistemic scores")
    sample = a["client"].next_sample("epistemic", {})  # MONAI Label's own Epistemic strategy, on our scores
    assert sample["id"] in {t["id"] for t in top}


def test_a_new_served_version_makes_every_score_stale_and_the_watcher_scores_again(fed):
    a = fed["site-a"]
    served = _active(a)["served_version"]
    assert served == 3  # the warm-up, then one round with each partner
    requests.post(a["url"] + f"/gcml/rollback/{served - 1}", timeout=10).raise_for_status()
    # scores from the version served before are stale from the rollback on; the watcher scores again
    act = until(lambda: (x := _active(a))["disagreement"]["current"] == 3 and x["served_version"] == served - 1
                and x, timeout=240, what="scores from the version served again")
    assert act["disagreement"]["last_run"]["served_version"] == served - 1
    assert all(t["partners"] for t in act["disagreement"]["top"])
