"""``gcml serve``, ``gcml sync``, ``gcml node`` and ``gcml status``: running a site and asking it how it is."""

from __future__ import annotations

import argparse
import os
import sys
import time

from gcml_app.config import load_config


def _serve(args: argparse.Namespace) -> int:
    from gcml_app.site.launch import server_command

    from gcml_app.store import ModelStore

    cfg = load_config(args.config)  # fail here, with the key path, rather than inside the server
    if cfg.train.distributed:  # node 0's secret: now, not as the first round's failure
        try:
            cfg.train.distributed.secret()
        except KeyError as e:
            print(f"gcml serve: {e.args[0]}", file=sys.stderr)
            return 2
    store = ModelStore(cfg.state_dir / "models")
    check_network(cfg, first_model=store.served_version() is None and not store.working_path.exists())
    cmd = server_command(args.config, args.studies, args.host or cfg.serve.host, args.port or cfg.serve.port)
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    os.execv(cmd[0], cmd)


def _node(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    from gcml_app.config.site import format_errors
    from gcml_app.rounds.node_service import serve_node
    from gcml_app.rounds.nodes import NodeRefused

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config)
    d = cfg.train.distributed
    if d is None:
        print(f"gcml node: {args.config} has no train.distributed section (nodes, node_rank, rendezvous, token_env)",
              file=sys.stderr)
        return 2
    if args.node_rank is not None:
        try:
            d = type(d).model_validate({**d.model_dump(), "node_rank": args.node_rank})
        except ValidationError as e:
            print(f"gcml node: --node-rank {args.node_rank}: {'; '.join(format_errors(e))}", file=sys.stderr)
            return 2
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"distributed": d})})
    try:
        serve_node(cfg, args.rounds)
    except (NodeRefused, KeyError) as e:
        print(f"gcml node: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0


def check_network(cfg, first_model: bool) -> None:
    """Build the site's network and, for a site's first model, its initial weights (``network.init_from``),
    so a bad bundle or checkpoint is a one-line error here, not a traceback in a server log or a sim run.

    Raises:
        InitError: what is wrong, naming the file.
    """
    from gcml_app.ml.network import build_network
    from gcml_app.rounds.loop import initial_state

    build_network(cfg)
    if cfg.network.init_from is not None and first_model:
        initial_state(cfg)


def _status(args: argparse.Namespace) -> int:
    from gcml_app.rounds.lock import running_round
    from gcml_app.store import ModelStore

    cfg = load_config(args.config)
    store = ModelStore(cfg.state_dir / "models")
    served = store.served()
    print(f"site {cfg.site}: state in {cfg.state_dir}")
    if (r := running_round(cfg.state_dir)) is not None:
        age = f", for {time.time() - r['started']:.0f} s" if isinstance(r.get("started"), float) else ""
        print(f"  round {r.get('round_id') or '(no id)'} running (trigger {r.get('trigger')}, pid {r.get('pid')}{age})")
    if served is None:
        print("  no published model yet")
    else:
        dice = ", ".join(f"{k} {v:.3f}" for k, v in served.val_dice.items())
        print(f"  serving v{served.version} ({served.produced_by}, {served.created}); val Dice {dice}; "
              f"n_train {served.n_train}, n_val {served.n_val}")
    for rec in store.history()[-args.last:]:
        print(f"  {rec['time']} {rec['event']:<8} v{rec.get('version')}  {rec.get('reason', '')}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    """Exit 0: the round ran (published, kept, or nothing new); 1: it failed; 3: no server answered."""
    import requests

    from gcml_app.rounds import summarize
    from gcml_app.site.client import RoundFailed, SiteClient

    cfg = load_config(args.config)
    site = SiteClient.for_site(cfg, args.server)
    try:
        task = site.sync(peers=args.peer)
        record = site.wait(task, timeout=args.timeout)
    except requests.HTTPError as e:
        print(f"{cfg.site}: sync refused: {e}")
        return 1
    except (RoundFailed, TimeoutError) as e:
        print(f"{cfg.site}: {e}")
        return 1
    except requests.RequestException as e:
        print(f"{cfg.site}: no answer from the site's server at {site.url}: {e}")
        return 3
    print(f"{cfg.site}: round {task['round_id']}: {summarize(record)}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``gcml`` subcommands of this module."""
    s = sub.add_parser("serve", help="start this site's MONAI Label server with the GCML app")
    s.add_argument("--config", required=True)
    s.add_argument("--studies", required=True, help="the studies folder, or a PACS's DICOMweb URL")
    s.add_argument("--host", default=None, help="default: serve.host of the YAML")
    s.add_argument("--port", type=int, default=None, help="default: serve.port of the YAML")
    s.set_defaults(func=_serve)

    s = sub.add_parser("sync", help="run one gossip round on this site's running server and print the outcome")
    s.add_argument("--config", required=True)
    s.add_argument("--server", default=None, help="default: the YAML's serve: host and port")
    s.add_argument("--peer", action="append", help="ask this partner (repeat for an order); default: the policy")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the round")
    s.set_defaults(func=_sync)

    s = sub.add_parser("node", help="run this machine's ranks of every round of a site on several machines")
    s.add_argument("--config", required=True, help="the site's YAML, with train.distributed")
    s.add_argument("--node-rank", type=int, default=None, help="this machine's place (default: the YAML's)")
    s.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (default: never)")
    s.set_defaults(func=_node)

    s = sub.add_parser("status", help="print the served model and recent decisions of a site")
    s.add_argument("--config", required=True)
    s.add_argument("--last", type=int, default=10)
    s.set_defaults(func=_status)
