"""The short soak: clients, rounds, gossip, scoring, the CLI and a partner restart at once; nothing lost."""

from __future__ import annotations

import json

import pytest

from gcml_app.sim.soak import soak_bench

pytestmark = pytest.mark.slow  # two real servers under load for two minutes


@pytest.mark.parametrize("interactive", [False, True], ids=["auto", "clicks"])
def test_a_short_soak_loses_no_label_records_every_round_and_writes_its_figures(tmp_path, interactive):
    """``clicks``: site-a clicks on (its partner without), each client clicking 1-3 times a case."""
    r = soak_bench(tmp_path / "soak", minutes=2.0, clients=3, quick=True, interactive=interactive)
    c = r["checks"]
    assert c["label_saves"] > 0 and c["labels_saved"] > 0
    assert (c["labels_lost"], c["corrupt_files"], c["lost"], c["corrupt"]) == (0, 0, [], [])
    assert c["datastore_json_valid"] and c["served_verifies"]
    assert c["rounds"] >= 3 and c["rounds_without_reason"] == 0  # the two warm-ups and at least one under load
    assert r["partner_restart"]["down_s"] > 0
    assert {"gcml_seg", "save_label", "next_sample", "info", "gcml status"} <= set(r["latency"])
    assert not any(k.startswith("save_label") for k in r["errors"]), r["errors"]  # no save refused or failed
    saved = json.loads((tmp_path / "soak" / "soak.json").read_text())
    assert saved["samples"] and "server_rss_mb" in saved["samples"][-1]
    assert (tmp_path / "soak" / "soak.png").stat().st_size > 0 and (tmp_path / "soak" / "soak_calls.csv").exists()
    if interactive:
        assert r["latency"]["gcml_edit"]["n"] > 0 and r["idle_edit"]["n"] == 10 and r["edit_p95_ratio"] > 0
        assert not any(k.startswith("gcml_edit") for k in r["errors"]), r["errors"]  # no click refused or failed
    else:
        assert "gcml_edit" not in r["latency"] and "edit_p95_ratio" not in r
