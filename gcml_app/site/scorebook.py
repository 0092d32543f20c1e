"""What an active-learning score rests on and where it lives (docs/design.md, "Which case to label next").

- :class:`Committee`: the models a score is computed from (the served version, each cached partner model's
  sha256); a score computed from any other committee is stale.
- :func:`load_models`, :func:`scorable`, :func:`candidates`: those models on a device, and the unlabelled
  images held on this server, newest first.
- :class:`ScoreBook`: ``<state_dir>/active/scores.json``, written by the scoring process alone under a lock,
  read by the datastore's image info and the strategies (:mod:`gcml_app.site.scoring`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from safetensors.torch import load_file

from gcml_app.config import SiteConfig
from gcml_app.federation.peers import PeerBook
from gcml_app.federation.state import GossipState
from gcml_app.ml.network import build_network, fit_state
from gcml_app.store import ModelStore
from gcml_app.util.files import atomic_write
from gcml_app.util.jsonl import clean

__all__ = ["DISAGREEMENT_KEY", "EPISTEMIC_KEY", "Committee", "ScoreBook", "candidates", "committee", "load_models",
           "scorable"]

logger = logging.getLogger(__name__)

DISAGREEMENT_KEY = "gcml_disagreement"  # {"score", "partners": {name: d}, "entropy", "served_version", ...}
EPISTEMIC_KEY = "epistemic_entropy"  # MONAI Label's key (its Epistemic strategy reads it); "epistemic_ts" beside it


# ---------------------------------------------------------------------------------------- what scores rest on
@dataclass(frozen=True)
class Committee:
    """The models a score is computed from: the served version and each cached partner model's sha256.

    Attributes:
        served: the served version (``None``: nothing published, nothing to score with).
        partners: ``{partner: {"version", "sha256"}}`` of the partner models cached by gossip.
    """

    served: int | None
    partners: dict[str, dict[str, Any]] = field(default_factory=dict)

    def key(self, method: str) -> str:
        """What a score of ``method`` must have been computed from to be current."""
        if method == "epistemic":
            return f"v{self.served}"
        return json.dumps([self.served, {k: v["sha256"] for k, v in sorted(self.partners.items())}])


def committee(cfg: SiteConfig, store: ModelStore) -> Committee:
    """The site's served version and the partner models gossip cached (configured partners only)."""
    state = GossipState(cfg.state_dir)
    book = PeerBook.open(state.peers_path)
    partners = {}
    for p in cfg.gossip.peers:
        rec = book.get(p.name)
        if rec.last_sha256 and state.cached_model(p.name).is_file():
            partners[p.name] = {"version": rec.last_version, "sha256": rec.last_sha256}
    return Committee(store.served_version(), partners)


def load_models(cfg: SiteConfig, store: ModelStore, com: Committee,
                device: torch.device) -> tuple[torch.nn.Module, dict[str, torch.nn.Module], dict[str, str]]:
    """The served network and each cached partner network, in eval mode on ``device``.

    A partner file was verified when it was pulled (``gcml_app.federation.client.check_payload``);
    one that no longer loads (replaced, torn) is left out, with its reason.

    Returns:
        ``(served, {partner: network}, {partner: why it was left out})``.
    """
    served = build_network(cfg)
    served.load_state_dict(fit_state(store.load(com.served), cfg))  # from before interactive changed: exact
    state = GossipState(cfg.state_dir)
    nets, skipped = {}, {}
    for name in com.partners:
        try:
            net = build_network(cfg)
            net.load_state_dict(fit_state(load_file(state.cached_model(name)), cfg))  # either guidance layout
            nets[name] = net.to(device).eval()
        except Exception as e:  # a partner's file must never stop the site's own scoring
            skipped[name] = clean(f"{type(e).__name__}: {e}", 200)
            logger.warning(f"scoring: partner model {name} left out: {skipped[name]}")
    return served.to(device).eval(), nets, skipped


def scorable(datastore: Datastore) -> dict[str, str]:
    """Unlabelled images held on this server: ``{image id: local file}``. A PACS datastore lists its cached
    series (``local_image_uri``) and never fetches one for scoring."""
    local = getattr(datastore, "local_image_uri", datastore.get_image_uri)
    out = {}
    for image_id in datastore.get_unlabeled_images(DefaultLabelTag.FINAL.value):
        uri = local(image_id)
        if uri and os.path.isfile(uri):
            out[image_id] = uri
    return out


def candidates(datastore: Datastore) -> list[tuple[str, str]]:
    """:func:`scorable` images newest first: ``[(image id, local file)]``; newest is the latest added to
    the datastore (MONAI Label's ``ts``, whole seconds), then the latest file."""
    out = [(-float(datastore.get_image_info(i).get("ts") or 0), -os.path.getmtime(u), i, u)
           for i, u in scorable(datastore).items()]
    return [(i, u) for *_, i, u in sorted(out)]


# ---------------------------------------------------------------------------------------- where scores live
class ScoreBook:
    """``<state_dir>/active/scores.json``: each image's scores and each method's last run.

    Layout: ``{"images": {id: {method: {..., "key": committee key}}}, "runs": {method: {...}},
    "competence": {partner: {"dice", "n_val", "key"}}}`` (a partner's Dice on the validation cases).
    Read-modify-write holds an ``fcntl`` lock; readers see the old file or the new one whole.
    """

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir) / "active"
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "scores.json"
        self._lock = self.root / ".lock"
        self._memo: tuple[tuple[int, int], dict[str, Any]] | None = None

    def read(self) -> dict[str, Any]:
        """The whole book (memoised by the file's mtime and size); empty when missing or unreadable."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {"images": {}, "runs": {}, "competence": {}}
        stamp = (st.st_mtime_ns, st.st_size)
        if self._memo is None or self._memo[0] != stamp:
            try:
                raw = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                logger.warning(f"{self.path}: unreadable ({e}); scores start afresh")
                raw = {}
            self._memo = (stamp, {"images": raw.get("images") or {}, "runs": raw.get("runs") or {},
                                  "competence": raw.get("competence") or {}})
        return self._memo[1]

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """The book to change in place; written back atomically on exit, under the lock."""
        with open(self._lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                self._memo = None
                book = json.loads(json.dumps(self.read()))  # a copy: the memo stays what the file says
                yield book
                atomic_write(self.path, json.dumps(book, allow_nan=False).encode())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def current(self, method: str, com: Committee) -> dict[str, dict[str, Any]]:
        """``{image id: score record}`` of ``method`` computed from ``com`` (stale and failed ones left out)."""
        key = com.key(method)
        return {i: s[method] for i, s in self.read()["images"].items()
                if (s.get(method) or {}).get("key") == key and "score" in s[method]}

    def info_of(self, image_id: str, com: Committee) -> dict[str, Any]:
        """What the image's datastore info shows: its current scores in MONAI Label's keys, or nothing."""
        entry = self.read()["images"].get(image_id) or {}
        out: dict[str, Any] = {}
        d = entry.get("disagreement") or {}
        if d.get("key") == com.key("disagreement") and "score" in d:
            out[DISAGREEMENT_KEY] = {k: v for k, v in d.items() if k != "key"}
        e = entry.get("epistemic") or {}
        if e.get("key") == com.key("epistemic") and "score" in e:
            out[EPISTEMIC_KEY], out["epistemic_ts"] = e["score"], e["served_version"]
        return out

    def stale(self, method: str, com: Committee, image_ids: list[str]) -> list[str]:
        """Of ``image_ids``, those without a record of ``method`` from ``com`` (a failure counts as done)."""
        key = com.key(method)
        images = self.read()["images"]
        return [i for i in image_ids if ((images.get(i) or {}).get(method) or {}).get("key") != key]
