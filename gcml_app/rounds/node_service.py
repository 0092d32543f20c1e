"""``gcml node``: another machine's ranks in every round of a site on several machines (docs/design.md,
"Several machines"; the protocol is :mod:`gcml_app.rounds.nodes`)."""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta

import torch.distributed as dist

from gcml_app.config import SiteConfig
from gcml_app.ml.device import round_devices
from gcml_app.rounds.nodes import NodeRefused, prove, unpack, verify
from gcml_app.rounds.ranks import join_round

__all__ = ["serve_node"]

logger = logging.getLogger(__name__)

CONNECT_S = 5.0  # a node's wait for node 0's store before it tries again (between rounds there is none)


def serve_node(cfg: SiteConfig, rounds: int | None = None) -> int:
    """Run this node's ranks of every round node 0 announces (``gcml node``); returns the rounds it ran.

    Between rounds node 0 has no store: the node tries again every few seconds. A round it refuses, or one
    that fails, is logged and the node waits for the next. ``rounds`` stops it after that many rounds
    (tests); ``None`` runs until it is stopped.
    """
    d = cfg.train.distributed
    if d is None or d.node_rank == 0:
        raise NodeRefused("gcml node runs on nodes 1.. of train.distributed; node 0 is the MONAI Label server")
    d.secret()  # fail now, not at the first round
    host, port = d.address()
    devices = round_devices(cfg)
    last, ran = None, 0
    logger.info(f"node {d.node_rank} of {d.nodes}: {len(devices)} rank(s), waiting for rounds at {host}:{port}")
    while rounds is None or ran < rounds:
        try:
            store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=CONNECT_S))
            store.wait(["work"], timedelta(seconds=CONNECT_S))
            raw = store.get("work")
        except RuntimeError:  # no round now (DistStoreError is a RuntimeError)
            time.sleep(1.0)
            continue
        if raw == last:  # the round this node just ran or refused, not yet closed
            time.sleep(1.0)
            continue
        last = raw
        try:
            announced = json.loads(raw)
            folder, local = verify(announced, cfg)
            if local != len(devices):
                raise NodeRefused(f"node 0 runs {local} rank(s) per node; this node's train.gpus gives {len(devices)}")
            work = unpack(folder)
        except Exception as e:  # NodeRefused, or work this version cannot read: the node waits for the next round
            logger.error(f"node {d.node_rank}: round refused: {e}")
            continue
        prove(store, announced, cfg)
        first, name = d.node_rank * local, announced["nonce"][:8]
        logger.info(f"node {d.node_rank}: round {name}: ranks {first}..{first + local - 1} of {d.nodes * local}")
        try:
            join_round(work, devices, first, d.nodes * local, host, port, folder, cfg)
        except Exception as e:  # the round fails at node 0 too, which records it; this node waits for the next
            logger.error(f"node {d.node_rank}: round {name} failed: {e}")
        ran += 1
    return ran
