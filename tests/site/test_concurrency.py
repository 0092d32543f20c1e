"""A working day's concurrency on a real server: many radiologists saving labels at once lose nothing."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import make_studies, write_config
from monailabel.client import MONAILabelClient

from gcml_app.site.datastore import GCMLDatastore
from gcml_app.site.launch import SiteServer

N = 20


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.slow  # a real MONAI Label server
def test_twenty_concurrent_label_saves_are_all_stored_intact_and_the_datastore_json_stays_valid(tmp_path):
    studies, truth = make_studies(tmp_path / "s", cases=N + 2, labelled=2)
    # no round in the way: the labels threshold is out of reach (new labels would otherwise queue one)
    config = write_config(tmp_path / "site", finetune={"min_new_labels": 0})
    with SiteServer(config, studies, log=tmp_path / "server.log") as server:
        ids = [f"case_{i:03d}" for i in range(2, N + 2)]

        def save(image_id: str) -> str:  # each its own client, as each radiologist's Slicer is
            return MONAILabelClient(server.url).save_label(image_id, str(truth / f"{image_id}.nii.gz"), "final", {})

        with ThreadPoolExecutor(N) as pool:
            answers = list(pool.map(save, ids))
        assert len(answers) == N
        listed = MONAILabelClient(server.url).datastore()
    stored = json.loads((studies / "datastore_v2.json").read_text())["objects"]  # valid JSON
    assert all("final" in stored[i]["labels"] for i in ids), [i for i in ids if "final" not in stored[i]["labels"]]
    for i in ids:  # every label's voxels as uploaded (values are already the task's indices)
        np.testing.assert_array_equal(_array(studies / "labels" / "final" / f"{i}.nii.gz"), _array(truth / f"{i}.nii.gz"))
    assert sum("final" in o["labels"] for o in listed["objects"].values()) == N + 2  # and the server lists them


def test_a_process_with_an_older_copy_of_the_datastore_never_writes_it_over_newer_labels(cfg, tmp_path):
    """The server and the training subprocess each hold the datastore JSON in memory: a save from one must
    not write its older copy over a label the other saved since (MONAI Label rewrites the whole file)."""
    studies, truth = make_studies(tmp_path / "s", cases=4, labelled=0)
    server, other = (GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False) for _ in range(2))
    other.save_label("case_000", str(truth / "case_000.nii.gz"), "final", {})
    server.save_label("case_001", str(truth / "case_001.nii.gz"), "final", {})
    other.save_label("case_002", str(truth / "case_002.nii.gz"), "final", {})
    stored = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    assert sorted(i for i, o in stored.items() if "final" in o["labels"]) == ["case_000", "case_001", "case_002"]
    fresh = GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False)
    assert sorted(fresh.get_labeled_images("final")) == ["case_000", "case_001", "case_002"]
