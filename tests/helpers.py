"""Test helpers: tiny site configs and sample studies (32^3 phantoms, small UNets)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from gcml_app.sim.phantoms import write_studies

TINY = {
    "site": "test-site",
    "labels": {"organ": 1, "lesion": 2},
    "spacing": [1.0, 1.0, 1.0],
    "roi_size": [32, 32, 32],
    "network": {"name": "UNet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "train": {"epochs": 2, "batch_size": 2, "samples_per_case": 1, "lr": 0.005, "seed": 0, "num_threads": 2},
    "validation": {"fraction": 0.2, "min_cases": 1},
    "state_dir": "state",
}


def write_config(folder: Path, **overrides) -> Path:
    """Write the tiny site YAML (with top-level overrides) into ``folder/site.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump({**TINY, **overrides}))
    return path


def make_studies(root: Path, cases: int, labelled: int, style: str = "a", seed: int = 0) -> tuple[Path, Path]:
    """A studies folder with ``labelled`` final labels, and a folder with every case's true label.

    Returns:
        ``(studies, truth)``; ``truth/<case>.nii.gz`` exists for all cases.
    """
    full = write_studies(root / "full", style, cases=cases, seed=seed)
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in range(cases):
        name = f"case_{i:03d}.nii.gz"
        shutil.copy(full / name, studies / name)
        if i < labelled:
            shutil.copy(full / "labels" / "final" / name, studies / "labels" / "final" / name)
    return studies, full / "labels" / "final"
