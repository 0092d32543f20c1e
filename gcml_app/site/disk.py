"""A site's disk, bounded (docs/design.md, "Disk"): what start-up sweeps, and what ``/gcml/status`` shows.

What grows, and what bounds it:

- model versions: ``store.keep_versions`` (:meth:`~gcml_app.store.ModelStore.prune`, after each publish
  and at start-up; rollback targets are kept);
- preprocessed cases: ``train.cache_max_gb`` (:class:`~gcml_app.ml.cache.CaseCache`, least recently used);
- the PACS cache: ``store.pacs_cache_max_gb`` (:meth:`~gcml_app.site.pacs.PacsDatastore.evict`);
- crash leftovers: partner-model spool files (``.pull-*``), interrupted atomic writes (``.*.tmp``),
  cache entries being written (``.entry.*.tmp``) and claimed version files with no manifest, swept by
  :func:`sweep_at_start` when the server starts (no round of its own runs then).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from gcml_app.config import SiteConfig
from gcml_app.federation.state import GossipState
from gcml_app.ml.cache import cache_root
from gcml_app.store import ModelStore

__all__ = ["disk_usage", "folder_bytes", "sweep_at_start"]

logger = logging.getLogger(__name__)


def _leftovers(folder: Path) -> list[Path]:
    """Spool files of pulls and temporary files of writes that a crash left in ``folder`` (not recursive)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and p.name.startswith(".")
            and (p.name.startswith(".pull-") or p.name.endswith(".tmp"))]


def sweep_at_start(cfg: SiteConfig, store: ModelStore) -> dict[str, Any]:
    """Remove what crashes left behind, then prune model versions to ``store.keep_versions``.

    Returns:
        ``{"swept": [names], "pruned": [versions], "freed_bytes": n}`` (also logged).
    """
    swept = store.sweep()
    freed = 0
    for folder in (GossipState(cfg.state_dir).cache, cfg.state_dir / "gossip", cfg.state_dir, cache_root(cfg)):
        for p in _leftovers(folder):
            try:
                freed += p.stat().st_size
                p.unlink()
                swept.append(p.name)
            except FileNotFoundError:
                pass
    pruned = store.prune(cfg.store.keep_versions)
    if swept:
        logger.warning(f"start-up: swept {len(swept)} files left by interrupted pulls or writes ({freed / 2**20:.1f} MB)")
    return {"swept": swept, "pruned": pruned["removed"], "freed_bytes": freed + pruned["freed_bytes"]}


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while walking
                pass
    return total


def disk_usage(cfg: SiteConfig, store: ModelStore, pacs_cache: Path | None = None) -> dict[str, Any]:
    """Bytes on disk by part, with each part's bound: ``{"models": {"bytes", "versions", "keep_versions"}, ...}``."""
    gossip = GossipState(cfg.state_dir).cache
    out: dict[str, Any] = {
        "models": {"bytes": folder_bytes(store.root), "versions": len(store.versions()),
                   "keep_versions": cfg.store.keep_versions},
        "working": {"bytes": store.working_path.stat().st_size if store.working_path.exists() else 0},
        "partner_models": {"bytes": folder_bytes(gossip)},
        "case_cache": {"bytes": folder_bytes(cache_root(cfg)), "max_bytes": int(cfg.train.cache_max_gb * 2**30)},
    }
    if pacs_cache is not None:
        out["pacs_cache"] = {"bytes": folder_bytes(pacs_cache), "max_bytes": int(cfg.store.pacs_cache_max_gb * 2**30)}
    out["total_bytes"] = sum(v["bytes"] for v in out.values())
    return out
