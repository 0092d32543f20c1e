"""The ``/gcml`` HTTP surfaces, mounted on MONAI Label's FastAPI app by :mod:`gcml_app.site.server`.

Peer surface (partner token required; see :mod:`.guard`):

- ``GET /gcml/peer/manifest``: what we serve (site, version, sha256, bytes, arch, created,
  val_dice, n_train, n_val, validated, lineage);
- ``GET /gcml/peer/model``: the weights (safetensors), ``ETag: "<sha256>"``, 304 on ``If-None-Match``;
  float16 when ``gossip.transport`` says so (the manifest's sha256 and bytes are the payload's).

Internal surface (annotation network only):

- ``GET /gcml/status``: served model, gossip state, partners, pending labels, running round;
- ``GET /gcml/history?limit=N&round=ID``: decisions, newest last;
- ``GET /gcml/audit?limit=N``: the audit trail (:mod:`.audit`);
- ``POST /gcml/sync`` (body ``{"peers": [...], "epochs": N}``, both optional): start a gossip round;
- ``POST /gcml/pause`` / ``POST /gcml/resume``: stop / restart scheduled rounds (survives restarts);
- ``POST /gcml/rollback/{version}``: serve an earlier version again.

Handlers are plain ``def``: FastAPI runs them in its thread pool, off the event loop.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Query, Request, Response
from monailabel.interfaces.utils.app import app_instance

from gcml_app.federation.payload import encode_weights, manifest_body
from gcml_app.federation.task import task_of
from gcml_app.rounds.gossip import SyncRequest
from gcml_app.store import Manifest, ModelStore, StoreError

__all__ = ["router"]

router = APIRouter(prefix="/gcml", tags=["GCML"])


def _site():
    return app_instance()


def _served_or_404():
    served = _site().store.served()
    if served is None:
        raise HTTPException(404, "no published model yet at this site")
    return served


@functools.lru_cache(maxsize=2)
def _encoded(root: str, version: int, sha256: str, transport: str) -> tuple[bytes, str]:
    """Version ``version`` re-encoded for ``transport`` (cached: partners pull the same version repeatedly)."""
    data = encode_weights(ModelStore(root).load(version), transport, arch=ModelStore(root).manifest(version).arch)
    return data, hashlib.sha256(data).hexdigest()


def _payload(m: Manifest) -> tuple[bytes | None, str, int]:
    """What partners download for the served version: ``(bytes or None for float32, sha256, size)``."""
    site = _site()
    transport = site.cfg.gossip.transport
    if transport == "float32":
        return None, m.sha256, m.bytes
    data, sha = _encoded(str(site.store.root), m.version, m.sha256, transport)
    return data, sha, len(data)


@router.get("/peer/manifest", summary="What this site serves to partners")
def peer_manifest() -> dict[str, Any]:
    m = _served_or_404()
    _, sha, size = _payload(m)
    cfg = _site().cfg
    return manifest_body(cfg.site, m, sha, size, cfg.gossip.transport, task_of(cfg))


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {t.strip().removeprefix("W/").strip('"') for t in header.split(",")}


@router.get("/peer/model", summary="This site's served weights (safetensors)", response_class=Response)
def peer_model(request: Request) -> Response:
    m = _served_or_404()
    data, sha, _ = _payload(m)
    headers = {"ETag": f'"{sha}"', "X-GCML-Version": str(m.version), "Cache-Control": "no-cache"}
    wanted = _etags(request.headers.get("if-none-match"))
    if sha in wanted or "*" in wanted:
        return Response(status_code=304, headers=headers)
    if data is None:
        data = _site().store.read_bytes(m.version)
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.get("/status", summary="Serving model, gossip state, partners, pending labels")
def status() -> dict[str, Any]:
    return _site().gcml_status()


@router.get("/history", summary="Round and publish decisions, oldest first")
def history(limit: int = Query(50, ge=1, le=10_000), round: str | None = None) -> list[dict[str, Any]]:
    records = _site().store.history()
    if round is not None:
        records = [r for r in records if r.get("round_id") == round]
    return records[-limit:]


@router.get("/audit", summary="The partner link's audit trail (requests to the peer surface, refusals, pulls)")
def audit(response: Response, limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
    log = _site().audit
    records = log.tail(limit)
    response.headers["X-GCML-Skipped-Lines"] = str(log.skipped_lines)  # torn lines among those read
    return records


@router.post("/sync", status_code=202, summary="Start a gossip round now")
def sync(body: dict[str, Any] | None = Body(None)) -> dict[str, Any]:
    site = _site()
    names = [p.name for p in site.cfg.gossip.peers]
    if not names:
        raise HTTPException(409, f"site {site.cfg.site} has no partners configured (gossip.peers)")
    try:
        req = SyncRequest.parse(body or {}, names)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    params = {k: v for k, v in (("peers", req.peers), ("epochs", req.epochs)) if v is not None}
    task, detail = site.start_round("gossip", trigger="sync", **params)
    if task is None:
        raise HTTPException(409, f"a round is already running; try again when it ends ({detail})")
    return task


@router.post("/pause", summary="Stop scheduled gossip rounds (kept across restarts)")
def pause() -> dict[str, Any]:
    _site().gossip_state.set_paused(True)
    return {"paused": True}


@router.post("/resume", summary="Restart scheduled gossip rounds")
def resume() -> dict[str, Any]:
    _site().gossip_state.set_paused(False)
    return {"paused": False}


@router.post("/rollback/{version}", summary="Serve an earlier version again")
def rollback(version: int, reason: str = Query("", max_length=500)) -> dict[str, Any]:
    store = _site().store
    if version not in store.versions():
        raise HTTPException(404, f"version {version} does not exist; known versions: {store.versions()}")
    try:
        man = store.rollback(version, reason=reason or "rollback requested over HTTP")
    except StoreError as e:
        raise HTTPException(409, str(e)) from None
    return {"version": man.version, "val_dice": man.val_dice, "produced_by": man.produced_by}
