"""The sample federation: site YAMLs for sites A, B and C from ``sample_configs/``, for a run's folders and ports.

Used by ``gcml demo`` and ``gcml bench`` (which measures a round of the same federation).
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["SAMPLE_CONFIGS", "STYLES", "site_yamls"]

SAMPLE_CONFIGS = Path(__file__).resolve().parents[2] / "sample_configs"
STYLES = ("a", "b", "c")


def site_yamls(out: Path, ports: dict[str, int], warmup_epochs: int, gossip_epochs: int,
               active: dict | None = None) -> dict[str, Path]:
    """Write each site's YAML: the sample config with this run's state folder, ports and epochs
    (and ``active`` settings: the bench scores on demand, ``{"poll_s": 0}``)."""
    paths = {}
    for style in STYLES:
        raw = yaml.safe_load((SAMPLE_CONFIGS / f"site_{style}.yaml").read_text())
        site = raw["site"]
        raw["state_dir"] = str(out / site / "state")
        raw["serve"] = {"host": "127.0.0.1", "port": ports[site]}
        g = raw.setdefault("gossip", {})
        g.update(epochs=gossip_epochs, warmup_epochs=warmup_epochs, interval_s=0)
        if active:
            raw["active"] = {**raw.get("active", {}), **active}
        for peer in g.get("peers", []):
            peer["url"] = f"http://127.0.0.1:{ports[peer['name']]}"
        path = out / site / "site.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        paths[site] = path
    return paths
