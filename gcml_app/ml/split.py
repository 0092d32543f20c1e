"""A fixed train/validation split that never reshuffles as new labels arrive."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from gcml_app.config import ValidationConfig
from gcml_app.util.files import atomic_write

__all__ = ["FixedSplit", "labels_for_validation"]


class FixedSplit:
    """Assigns each case to ``train`` or ``val`` once, persisted in a JSON file, and never moves it.

    Rule for cases not seen before (taken in sorted id order, so a batch is assigned
    deterministically): a case joins ``val`` while there are fewer than ``min_cases`` validation
    cases, or while validation would otherwise fall below ``fraction`` of all assigned cases;
    otherwise it joins ``train``.

    Args:
        path: the JSON file holding ``{case_id: "train" | "val"}``.
        cfg: the validation settings.
    """

    def __init__(self, path: str | os.PathLike, cfg: ValidationConfig):
        self.path = Path(path)
        self.cfg = cfg

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def assigned(self) -> dict[str, str]:
        """Every case assigned so far: ``{case_id: "train" | "val"}`` (read only)."""
        return self._load()

    def assign(self, case_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Assign unseen cases, persist, and return ``(train, val)`` among ``case_ids`` (sorted)."""
        ids = sorted(set(case_ids))
        split = self._load()
        new = [c for c in ids if c not in split]
        if new:
            n_val = sum(1 for v in split.values() if v == "val")
            for c in new:
                total = len(split) + 1
                is_val = n_val < self.cfg.min_cases or n_val < self.cfg.fraction * total
                split[c] = "val" if is_val else "train"
                n_val += is_val
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(split, indent=1, sort_keys=True).encode())
        return [c for c in ids if split[c] == "train"], [c for c in ids if split[c] == "val"]


def labels_for_validation(cfg: ValidationConfig, n_train: int, n_val: int, target: int) -> int:
    """How many more labelled cases bring the validation split to ``target`` cases under the split rule.

    Example:
        >>> labels_for_validation(ValidationConfig(fraction=0.2, min_cases=2), n_train=6, n_val=2, target=5)
        13
    """
    added = 0
    while n_val < target:
        total = n_train + n_val + 1
        if n_val < cfg.min_cases or n_val < cfg.fraction * total:
            n_val += 1
        else:
            n_train += 1
        added += 1
    return added
