"""One round over several machines of a site: the work as signed files, and the node that runs its share
(docs/design.md, "Several machines"; config ``train.distributed``).

Node 0, the MONAI Label server, runs the round as on one machine (:mod:`gcml_app.rounds.ranks`), with
two differences: its rendezvous store listens on ``train.distributed.rendezvous`` and it announces the
round there. The announcement names a folder in the shared ``state_dir`` holding the round's
:class:`~gcml_app.rounds.compute.RoundWork` as JSON and safetensors (:func:`pack`; never a pickle, which
would run code from whoever can write the folder or talk to the store) and an HMAC of its digest with
the nodes' shared secret. Every other node runs :func:`~gcml_app.rounds.node_service.serve_node`
(``gcml node``): it waits for an announcement, runs only work whose MAC it verifies, proves in turn
that it holds the secret (node 0's ranks join the group only once every node has), and starts its ranks
in the same group. Rank 0, on node 0, alone writes the result; node 0 alone decides and commits.

The rendezvous store and the gloo/NCCL traffic are not encrypted (``torch.distributed`` has no such
option): the MACs keep a stray or misconfigured process from running or joining a round, not an
attacker who can already read the site's training network, which must be as private as the shared
file system that holds its cases.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from gcml_app.config import SiteConfig
from gcml_app.rounds.compute import RoundWork
from gcml_app.rounds.producers import DCML, Alone, Choice, Local, Producer

__all__ = ["FORMAT", "NodeRefused", "announce", "check_proofs", "pack", "prove", "unpack", "verify"]

logger = logging.getLogger(__name__)

FORMAT = 1  # the work folder's format; a node refuses any other
WORK_JSON, WORK_TENSORS = "work.json", "work.safetensors"
_FOLDER = re.compile(r"\.ranks-[A-Za-z0-9_]+")  # what launch's temporary folders are called


class NodeRefused(RuntimeError):
    """Work a node will not run, or a node the round will not admit: the reason names which check failed."""


# -- the work as files ----------------------------------------------------------------------------------------------

def pack(work: RoundWork, folder: Path) -> str:
    """Write ``work`` into ``folder`` as ``work.json`` and ``work.safetensors``; returns their digest (sha256)."""
    tensors = {f"start/{k}": v for k, v in work.start.items()}
    tensors |= {f"served/{k}": v for k, v in (work.served or {}).items()}
    meta: dict[str, Any] = {
        "format": FORMAT, "cfg": work.cfg.model_dump(mode="json"), "cases": work.cases,
        "train_ids": work.train_ids, "val_ids": work.val_ids, "epochs": work.epochs, "seed": work.seed,
        "unlabelled": work.unlabelled, "served": work.served is not None, "producer": _producer(work.producer, tensors),
    }
    if work.rng is not None:
        kind, keys, pos, has_gauss, cached = work.rng["numpy"]
        version, state, gauss = work.rng["random"]
        tensors["rng/torch"] = work.rng["torch"]
        tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        meta["rng"] = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                       "random": [version, list(state), gauss]}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WORK_TENSORS))
    (folder / WORK_JSON).write_text(json.dumps(meta))
    return _digest(folder)


def unpack(folder: Path) -> RoundWork:
    """The :class:`RoundWork` that :func:`pack` wrote (verify its digest first: :func:`verify`)."""
    meta = json.loads((folder / WORK_JSON).read_text())
    if meta.get("format") != FORMAT:
        raise NodeRefused(f"work format {meta.get('format')!r}; this node reads format {FORMAT} "
                          "(run the same gcml_app version on every node)")
    tensors = load_file(str(folder / WORK_TENSORS))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    rng = None
    if "rng" in meta:
        kind, pos, has_gauss, cached = meta["rng"]["numpy"]
        version, state, gauss = meta["rng"]["random"]
        rng = {"torch": tensors["rng/torch"], "random": (version, tuple(state), gauss),
               "numpy": (kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached)}
    return RoundWork(SiteConfig.model_validate(meta["cfg"]), meta["cases"], meta["train_ids"], meta["val_ids"],
                     _producer_from(meta["producer"], part("partner/")), part("start/"),
                     part("served/") if meta["served"] else None, meta["epochs"], meta["seed"], meta["unlabelled"], rng)


def _producer(p: Producer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A producer as JSON (its partner's weights go into ``tensors``): the round's producers only."""
    choice = p.choice.__dict__ if getattr(p, "choice", None) is not None else None
    common = {"sha256": p.incoming_sha256, "origin": p.origin, "file": p.incoming_file, "choice": choice}
    if type(p) is Local:
        return {"kind": "local"}
    if type(p) is DCML:
        tensors |= {f"partner/{k}": v for k, v in p.state.items()}
        return {"kind": "dcml", "train_incoming": p.train_incoming, **common}
    if type(p) is Alone:
        return {"kind": "alone", **common}
    raise NodeRefused(f"a {type(p).__name__} round does not run over several machines (rounds of the site's "
                      "own producers do: local, dcml)")


def _producer_from(spec: dict[str, Any], partner: dict[str, torch.Tensor]) -> Producer:
    kind = spec.get("kind")
    if kind == "local":
        return Local()
    choice = Choice(**spec["choice"]) if spec.get("choice") else None
    if kind == "dcml":
        p = DCML(partner, spec["sha256"], spec["origin"], spec["file"])
        p.train_incoming, p.choice = spec["train_incoming"], choice
        return p
    if kind == "alone" and choice is not None:
        return Alone(DCML({}, spec["sha256"], spec["origin"], spec["file"]), choice)
    raise NodeRefused(f"producer {kind!r} in the work; expected local, dcml or alone")


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in (WORK_JSON, WORK_TENSORS):
        h.update(name.encode())
        h.update(hashlib.sha256((folder / name).read_bytes()).digest())
    return h.hexdigest()


# -- the announcement and the proofs ---------------------------------------------------------------------------------

def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def announce(store: dist.Store, folder: Path, digest: str, cfg: SiteConfig, local: int) -> str:
    """Tell the other nodes about this round's work (in ``folder``, digest ``digest``); returns its nonce."""
    nonce = secrets.token_hex(16)
    d = cfg.train.distributed
    body = {"nonce": nonce, "folder": folder.name, "digest": digest, "local": local, "nodes": d.nodes}
    store.set("work", json.dumps({**body, "mac": _mac(d.secret(), "work", nonce, folder.name, digest, str(local))}))
    return nonce


def verify(announced: dict[str, Any], cfg: SiteConfig) -> tuple[Path, int]:
    """Check an announcement against this node's config and secret and the files it names.

    Returns:
        the work folder and the ranks per node.

    Raises:
        NodeRefused: a folder outside ``state_dir``, another node count, a MAC that does not verify (another
            secret, or work someone else wrote), or files whose digest differs from the announced one.
    """
    d = cfg.train.distributed
    if not isinstance(announced, dict):
        raise NodeRefused(f"an announcement of type {type(announced).__name__}; expected a JSON object")
    name, local = str(announced.get("folder", "")), announced.get("local")
    if not _FOLDER.fullmatch(name):
        raise NodeRefused(f"work folder {name!r}; expected a round's .ranks-* folder inside state_dir")
    if announced.get("nodes") != d.nodes or not isinstance(local, int) or local < 1:
        raise NodeRefused(f"a round of {announced.get('nodes')} nodes x {local} ranks; this node's "
                          f"train.distributed.nodes is {d.nodes}")
    want = _mac(d.secret(), "work", str(announced.get("nonce")), name, str(announced.get("digest")), str(local))
    if not hmac.compare_digest(want, str(announced.get("mac", ""))):
        raise NodeRefused(f"the announcement's MAC does not verify with {d.token_env} (another secret, or not node 0)")
    folder = Path(cfg.state_dir) / name
    try:
        digest = _digest(folder)
    except OSError as e:
        raise NodeRefused(f"work folder {folder} unreadable ({e}): is state_dir the shared one on every "
                          "node?") from None
    if digest != announced["digest"]:
        raise NodeRefused(f"work in {folder} differs from what node 0 announced (digest {digest[:12]}, "
                          f"announced {str(announced['digest'])[:12]})")
    return folder, local


def prove(store: dist.Store, announced: dict[str, Any], cfg: SiteConfig) -> None:
    """This node's proof that it holds the secret, for the round it is joining."""
    d = cfg.train.distributed
    store.set(f"node/{d.node_rank}", _mac(d.secret(), "node", announced["nonce"], str(d.node_rank)))


def check_proofs(store: dist.Store, nonce: str, cfg: SiteConfig) -> bool:
    """Whether every other node has proved itself for round ``nonce`` (``False``: not all yet).

    Raises:
        NodeRefused: a node's proof does not verify.
    """
    d, secret = cfg.train.distributed, cfg.train.distributed.secret()
    keys = [f"node/{k}" for k in range(1, d.nodes)]
    if not store.check(keys):
        return False
    for k, key in enumerate(keys, start=1):
        if not hmac.compare_digest(store.get(key).decode(), _mac(secret, "node", nonce, str(k))):
            raise NodeRefused(f"node {k}'s proof does not verify with {d.token_env} (another secret)")
    return True
