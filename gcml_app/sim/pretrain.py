"""``gcml simulate --init pretrained``: a "Model Zoo bundle" trained at a separate synthetic site.

A hospital rarely starts from random weights: it starts from a public bundle trained elsewhere, on
other scanners. The simulator's stand-in is a site no federation member has (style ``p``, its own
cases), trained alone and exported in MONAI's bundle layout; every site of every method then starts
from it through ``network.init_from``, as a deployment would. Its cases are drawn from a seed of their
own, so the bundle differs per simulation seed like everything else.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gcml_app.config import BundleNetConfig, SiteConfig
from gcml_app.ml.bundle import write_bundle
from gcml_app.ml.network import network_def
from gcml_app.rounds.loop import run_round
from gcml_app.sim.phantoms import write_studies
from gcml_app.store import ModelStore

__all__ = ["pretrained_bundle"]

PRETRAIN_CASES = 24


def pretrained_bundle(cfg: SiteConfig, root: Path, seed: int, epochs: int) -> Path:
    """Train the separate site's model for ``epochs`` and export it as a bundle at ``root / "bundle"``.

    Returns:
        the bundle folder (``configs/``, ``models/model.pt``).
    """
    if isinstance(cfg.network, BundleNetConfig):
        raise ValueError("--init pretrained: network is already a bundle (network.name: bundle); expected UNet or SegResNet")
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    data = write_studies(root / "data", "p", cases=PRETRAIN_CASES, seed=seed * 1000 + 999)
    cases = [{"id": Path(c["image"]).name.split(".")[0], **c} for c in
             [{"image": str(img), "label": str(data / "labels" / "final" / img.name)}
              for img in sorted(data.glob("*.nii.gz"))]]
    raw = cfg.model_dump(mode="json")
    raw.update(site="pretrain", state_dir=str(root / "state"),
               network={**raw["network"], "init_from": None},
               train={**raw["train"], "cache_dir": str(root / "cache")},
               gossip={}, security={}, serve={})
    site = SiteConfig.model_validate(raw)
    store = ModelStore(site.state_dir / "models")
    run_round(site, store, cases, epochs=epochs, extra={"trigger": "simulate", "stage": "pretrain"}, seed=seed)
    state = store.load(store.served_version())
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    channels = {0: "background", **{i: n for i, n in enumerate(cfg.labels, start=1)}}
    return write_bundle(root / "bundle", network_def(cfg), backbone, name="gcml-sim pretrained (style p)",
                        version=f"0.1.{seed}", channel_def=channels)
