"""``gcml``: sample data, serving a site, site status, and the demo.

    gcml sample-data --out DIR --site-style a --cases 12 --labelled 8 --seed 0
    gcml sample-data --dicom DIR [--modality CT|MR]   the same phantoms as DICOM series and DICOM SEG
    gcml pacs-load DIR --url http://pacs:8042/dicom-web   STOW them (credentials: MONAI Label's env settings)
    gcml serve --config site.yaml --studies DIR|URL [--host H --port P]   (default: the YAML's serve:)
    gcml status --config site.yaml
    gcml node --config site.yaml [--node-rank K]   another machine's ranks in every round (train.distributed)
    gcml sync --config site.yaml [--peer NAME ...]   one gossip round on the running server (cron)
    gcml demo [--out gcml-demo --port 8001 --epochs 30 --gossip-epochs 5 --rounds 3 --no-wait --pacs]
    gcml simulate [--scenario few-labels --seeds 3 --rounds 8 --methods local,gcml,... --data DIR --until-plateau P]
    gcml simulate --active [--k 2 --start 2 --strategies random,epistemic,disagreement]
    gcml bench [--out gcml-bench --quick] [--scale | --clicks | --gpu | --ddp N | --soak MINUTES --clients K]
    gcml token new --peer site-b [--id site-b-2026q4]     a partner token, printed once, and its hash
    gcml certs --out pki --sites site-a,site-b,site-c     a trial CA and site certificates (mutual TLS)
"""

from __future__ import annotations

import argparse
import sys

from gcml_app.cli import bench, data, demo, security, simulate, site
from gcml_app.config import ConfigError
from gcml_app.errors import InitError
from gcml_app.sim.data import SiteDataError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gcml", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for module in (data, site, simulate, security, bench, demo):  # the order of gcml --help
        module.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.argv = argv  # for what heads a result's tables
    try:
        return args.func(args)
    except (ConfigError, SiteDataError, InitError) as e:
        print(str(e), file=sys.stderr)
        return 2

