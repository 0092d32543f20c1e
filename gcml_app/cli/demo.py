"""``gcml demo``: three sites on loopback."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> int:
    from gcml_app.demo import run_demo

    return run_demo(args.out, port=args.port, cases=args.cases, labelled=args.labelled, warmup_epochs=args.epochs,
                    gossip_epochs=args.gossip_epochs, rounds=args.rounds, wait=not args.no_wait,
                    pacs=args.pacs)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``gcml`` subcommands of this module."""
    s = sub.add_parser("demo", help="three sites on loopback: sample data, warm-up, gossip rounds, then serve")
    s.add_argument("--out", default="gcml-demo")
    s.add_argument("--port", type=int, default=8001, help="site A's port (B, C: the next two); 0 picks free ports")
    s.add_argument("--cases", type=int, default=12)
    s.add_argument("--labelled", type=int, default=8)
    s.add_argument("--epochs", type=int, default=30, help="warm-up epochs of each site")
    s.add_argument("--gossip-epochs", type=int, default=5, help="DCML epochs per gossip round")
    s.add_argument("--rounds", type=int, default=3, help="gossip rounds (each site pulls once per round)")
    s.add_argument("--no-wait", action="store_true", help="exit after the first inference instead of serving")
    s.add_argument("--pacs", action="store_true", help="site A's images in a private Orthanc (DICOMweb), not a folder")
    s.set_defaults(func=_demo)
