"""``gcml sample-data`` and ``gcml pacs-load``: phantoms as a studies folder or DICOM, and a folder into a PACS."""

from __future__ import annotations

import argparse
import sys

from gcml_app.sim.phantoms import STYLES


def _sample_data(args: argparse.Namespace) -> int:
    from gcml_app.sim.phantoms import write_dicom_studies, write_studies

    n_lab = args.cases if args.labelled is None else args.labelled
    if args.dicom:
        out = write_dicom_studies(args.dicom, args.site_style, args.cases, args.labelled, args.seed, args.modality)
        print(f"wrote {args.cases} style-{args.site_style} phantoms as {args.modality} DICOM series ({n_lab} with a "
              f"DICOM SEG) to {out}; load them into a PACS with: gcml pacs-load {out} --url URL")
        return 0
    out = write_studies(args.out, args.site_style, args.cases, args.labelled, args.seed)
    print(f"wrote {args.cases} style-{args.site_style} phantoms ({n_lab} with final labels) to {out}")
    return 0


def _pacs_load(args: argparse.Namespace) -> int:
    import requests

    from gcml_app.site.dicomweb import pacs_client, stow_folder

    try:
        client = pacs_client(args.url)
        n = stow_folder(args.folder, client)
    except (ValueError, requests.RequestException) as e:
        print(f"gcml pacs-load: storing into the PACS failed: {e}", file=sys.stderr)
        return 2
    print(f"stored {n} DICOM instances from {args.folder} in {args.url}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``gcml`` subcommands of this module."""
    s = sub.add_parser("sample-data", help="write a MONAI Label studies folder (or DICOM for a PACS) of phantoms")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="a studies folder: NIfTI images and labels/final/")
    where.add_argument("--dicom", help="a folder of DICOM series (one folder per case) and DICOM SEG labels")
    s.add_argument("--modality", default="CT", choices=["CT", "MR"], help="with --dicom: the images' SOP class")
    s.add_argument("--site-style", default="a", choices=sorted(STYLES),
                   help="a, b, c: the semantic-shift sample federation; s1-s5: the few-labels scanners")
    s.add_argument("--cases", type=int, default=12)
    s.add_argument("--labelled", type=int, default=None, help="how many cases get a final label (default: all)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample_data)

    s = sub.add_parser("pacs-load", help="store a folder of DICOM files in a PACS over DICOMweb (STOW-RS)")
    s.add_argument("folder", help="e.g. the output of gcml sample-data --dicom")
    s.add_argument("--url", required=True, help="the PACS's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    s.set_defaults(func=_pacs_load)
