import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import write_config

from gcml_app.cli import main
from gcml_app.sim.phantoms import LABELS, STYLES, write_studies


def test_sample_data_writes_a_studies_folder(tmp_path, capsys):
    assert main(["sample-data", "--out", str(tmp_path / "s"), "--site-style", "b", "--cases", "3", "--labelled", "2"]) == 0
    assert "wrote 3 style-b phantoms (2 with final labels)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "s").glob("*.nii.gz")) == [f"case_00{i}.nii.gz" for i in range(3)]
    assert len(list((tmp_path / "s" / "labels" / "final").glob("*.nii.gz"))) == 2


def test_phantoms_are_deterministic_and_sites_differ(tmp_path):
    a1 = write_studies(tmp_path / "a1", "a", cases=2, seed=3)
    a2 = write_studies(tmp_path / "a2", "a", cases=2, seed=3)
    arr = {k: sitk.GetArrayFromImage(sitk.ReadImage(str(p / "case_001.nii.gz"))) for k, p in {"a1": a1, "a2": a2}.items()}
    assert np.array_equal(arr["a1"], arr["a2"])
    stats = {}
    for style in STYLES:
        d = write_studies(tmp_path / style, style, cases=2, seed=0)
        img = sitk.ReadImage(str(d / "case_000.nii.gz"))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "labels" / "final" / "case_000.nii.gz")))
        assert set(np.unique(lab)) == {0, *LABELS.values()}
        stats[style] = (img.GetSpacing(), round(float(sitk.GetArrayFromImage(img)[lab == 1].mean()), 1))
    assert len(set(stats.values())) == len(STYLES)  # spacing and intensity differ between sites


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample-data", "--out", "x", "--cases", "2", "--labelled", "3"], "labelled: found 3; expected between 0 and cases=2"),
        (["sample-data", "--out", "x", "--cases", "0"], "cases: found 0; expected at least 1"),
    ],
)
def test_sample_data_bad_arguments(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        main(argv)


def test_bad_config_exits_2_with_the_key_path(tmp_path, capsys):
    path = write_config(tmp_path, roi_size=[31, 32, 32])
    assert main(["status", "--config", str(path)]) == 2
    assert "roi_size: found [31, 32, 32]; expected positive sizes divisible by 4" in capsys.readouterr().err


BAD_STARTS = [
    # (network settings, the one line gcml serve prints)
    ({"init_from": "missing.pt"}, r"^network\.init_from: .*missing\.pt: file not found$"),
    ({"name": "bundle", "init_from": "no_bundle"}, r"^network\.init_from: .*no_bundle: not a bundle folder$"),
    ({"feature_layer": "model.7"}, r"^network\.feature_layer: found 'model\.7'; expected a module of the network"),
]


@pytest.mark.parametrize("network, message", BAD_STARTS)
def test_serve_refuses_a_bad_start_in_one_line_before_launching(tmp_path, capsys, network, message):
    from helpers import TINY

    config = write_config(tmp_path, network=network if "name" in network else {**TINY["network"], **network})
    assert main(["serve", "--config", str(config), "--studies", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(message, err), err


def test_status_before_any_model(tmp_path, capsys):
    assert main(["status", "--config", str(write_config(tmp_path))]) == 0
    assert "no published model yet" in capsys.readouterr().out


def test_status_names_the_running_round(tmp_path, capsys):
    from gcml_app.config import load_config
    from gcml_app.rounds.lock import one_round
    from gcml_app.store import ModelStore

    config = write_config(tmp_path)
    cfg = load_config(config)
    with one_round(cfg, ModelStore(cfg.state_dir / "models"), "sync", "r-now"):
        assert main(["status", "--config", str(config)]) == 0
    assert re.search(r"round r-now running \(trigger sync, pid \d+, for \d+ s\)", capsys.readouterr().out)
    assert main(["status", "--config", str(config)]) == 0
    assert " running (" not in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_a_three_site_federation(tmp_path):
    import json

    out = subprocess.run(
        [sys.executable, "-m", "gcml_app.cli", "demo", "--out", str(tmp_path / "demo"), "--port", "0",
         "--epochs", "3", "--gossip-epochs", "1", "--rounds", "1", "--cases", "6", "--labelled", "5", "--no-wait"],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for site in ("site-a", "site-b", "site-c"):
        assert f"{site}: published v1: local round" in out.stdout
        assert f"round 1 {site}: " in out.stdout and "gossip with site-" in out.stdout
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(report["sites"]) == {"site-a", "site-b", "site-c"}
    assert [r["site"] for r in report["rounds"]] == ["site-a", "site-b", "site-c"]
    assert all(r["bytes_pulled"] > 0 for r in report["rounds"])
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert "MONAI Label module -> Server: http://127.0.0.1:" in out.stdout
    assert "auto-segmented case_" in out.stdout

