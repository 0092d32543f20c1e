"""Per-site data for the simulator and the benchmark: synthetic phantoms or the per-site NIfTI layout.

Real data uses the layout users already know::

    DIR/<site>/imagesTr/<case>.nii.gz    DIR/<site>/labelsTr/<case>.nii.gz
    DIR/<site>/imagesTs/<case>.nii.gz    DIR/<site>/labelsTs/<case>.nii.gz   (optional test set)
    DIR/<site>/imagesUn/<case>.nii.gz                                         (optional unlabelled pool)

Without a test set, the last ``test_fraction`` of a site's sorted cases are held out for testing.
Of the rest, the last ``val_fraction`` (at least one) are the site's validation cases; the others train.
The unlabelled pool stands for the images of a site's datastore that nobody has labelled: DCML's
unlabelled term trains on them (``dcml.lambda_unl``); no other method can use them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import yaml

from gcml_app.sim.phantoms import write_studies

__all__ = ["SCENARIOS", "SimSite", "SiteDataError", "load_sites", "scenario_sites", "site_names"]

Case = dict[str, str]


class SiteDataError(ValueError):
    """The per-site layout is unusable; the message names the file or folder."""


@dataclass
class SimSite:
    """One site's cases, split once and never moved."""

    name: str
    train: list[Case] = field(default_factory=list)
    val: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    unlabelled: list[Case] = field(default_factory=list)  # images without a label: {"id", "image"}
    settings: dict = field(default_factory=dict)  # per-site config keys (intensity, spacing) from site.yaml


def _split(name: str, cases: list[Case], test: list[Case] | None, test_fraction: float, val_fraction: float) -> SimSite:
    if test is None:
        n_test = max(1, round(len(cases) * test_fraction))
        cases, test = cases[:-n_test], cases[-n_test:]
    n_val = max(1, round(len(cases) * val_fraction))
    if len(cases) - n_val < 1:
        raise SiteDataError(f"site {name}: found {len(cases) + len(test)} cases; expected enough for at least "
                            "1 train, 1 validation and 1 test case")
    return SimSite(name, train=cases[:-n_val], val=cases[-n_val:], test=test)


def _pairs(folder: Path, images: str, labels: str) -> list[Case]:
    img_dir, lab_dir = folder / images, folder / labels
    if not img_dir.is_dir():
        raise SiteDataError(f"{img_dir}: missing; expected a folder of NIfTI images (*.nii.gz)")
    cases = []
    for img in sorted(img_dir.glob("*.nii*")):
        lab = lab_dir / img.name
        if not lab.is_file():
            raise SiteDataError(f"{lab}: missing; expected the label of {img}")
        try:
            si, sl = (sitk.ImageFileReader() for _ in range(2))
            si.SetFileName(str(img))
            sl.SetFileName(str(lab))
            si.ReadImageInformation()
            sl.ReadImageInformation()
        except RuntimeError as e:
            raise SiteDataError(f"{img} or {lab}: not a readable image ({str(e).splitlines()[0]})") from None
        if si.GetSize() != sl.GetSize():
            raise SiteDataError(f"{lab}: shape {sl.GetSize()} does not match its image {img} of shape {si.GetSize()}")
        cases.append({"id": img.name.split(".")[0], "image": str(img), "label": str(lab)})
    if not cases:
        raise SiteDataError(f"{img_dir}: no *.nii.gz images")
    return cases


def _images(folder: Path) -> list[Case]:
    """The unlabelled pool ``folder`` (``imagesUn/``): every readable ``*.nii*``, by name."""
    cases = []
    for img in sorted(folder.glob("*.nii*")):
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(str(img))
            r.ReadImageInformation()
        except RuntimeError as e:
            raise SiteDataError(f"{img}: not a readable image ({str(e).splitlines()[0]})") from None
        cases.append({"id": "un_" + img.name.split(".")[0], "image": str(img)})
    return cases


def load_sites(data: str | Path, test_fraction: float = 0.25, val_fraction: float = 0.2) -> list[SimSite]:
    """Read ``DIR/<site>/imagesTr|labelsTr[/imagesTs|labelsTs][/imagesUn]`` for every site folder in ``data``.

    Raises:
        SiteDataError: no site folders, a missing label, a label whose shape differs from its image,
            an unreadable file, or too few cases; the message names the file.
    """
    data = Path(data)
    folders = sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
    if len(folders) < 2:
        raise SiteDataError(f"{data}: found {len(folders)} site folders; expected at least 2 (DIR/<site>/imagesTr, ...)")
    return [_load_site(f, test_fraction, val_fraction) for f in folders]


SITE_KEYS = ("intensity", "spacing")
"""Keys a ``DIR/<site>/site.yaml`` may set for its site (the network is shared by the federation)."""


def _site_settings(folder: Path) -> dict:
    path = folder / "site.yaml"
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SiteDataError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or set(raw) - set(SITE_KEYS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise SiteDataError(f"{path}: found {found}; expected a mapping with only {list(SITE_KEYS)}")
    return raw


def _load_site(folder: Path, test_fraction: float, val_fraction: float) -> SimSite:
    test = _pairs(folder, "imagesTs", "labelsTs") if (folder / "imagesTs").is_dir() else None
    site = _split(folder.name, _pairs(folder, "imagesTr", "labelsTr"), test, test_fraction, val_fraction)
    site.settings = _site_settings(folder)
    if (folder / "imagesUn").is_dir():
        site.unlabelled = _images(folder / "imagesUn")
    return site


def site_names(styles: list[str]) -> list[str]:
    """``site-a``, ``site-b``, ...; a style used again gets a number (``site-a2``)."""
    seen: dict[str, int] = {}
    names = []
    for s in styles:
        seen[s] = seen.get(s, 0) + 1
        names.append(f"site-{s}" if seen[s] == 1 else f"site-{s}{seen[s]}")
    return names


SCENARIOS: dict[str, list[tuple[str, int, int, int]]] = {
    # (style, train, validation, test cases) per site; each site also gets an unlabelled pool of
    # UNLABELLED_PER_TRAIN times its training cases
    "few-labels": [("s1", 12, 4, 20), ("s2", 2, 4, 20), ("s3", 3, 4, 20), ("s4", 4, 4, 20), ("s5", 3, 4, 20)],
    "semantic-shift": [("a", 9, 3, 4), ("b", 9, 3, 4), ("c", 9, 3, 4)],
    "modality-shift": [("s1", 12, 4, 20), ("s2", 4, 4, 20), ("t2", 4, 4, 20), ("ct", 4, 4, 20)],
    # "A+B": one case in MIX_EVERY from scanner B, the rest from A (train, validation and test alike)
    "mixed-scanners": [("s1+t2", 12, 4, 20), ("s2+ct", 4, 4, 20), ("t2+s1", 4, 4, 20), ("ct+s2", 4, 4, 20)],
}
"""Named synthetic federations (measured in docs/results.md):

- ``few-labels``: five scanners, one anatomy and label meaning; one data-rich site and four with
  2-4 labelled training cases; 4 validation and 20 test cases each.
- ``semantic-shift``: the first sample federation; style b's lesion is darker than its organ.
- ``modality-shift``: a data-rich and an ordinary site beside an inverted-contrast (T2-like) site and
  a CT-range site with half the z-resolution: a shift no intensity normalisation bridges.
- ``mixed-scanners``: the sites of ``modality-shift``, but each site's datastore also holds images of a
  second scanner, one case in :data:`MIX_EVERY` (a hospital with two scanners, or outside studies), and
  that scanner is a partner's main one. Its test cases have the same mix.
"""
MIX_EVERY = 4
UNLABELLED_PER_TRAIN = 3  # a datastore holds more images than labels: 3 unlabelled per labelled training case


def scenario_sites(out: str | Path, scenario: str, seed: int = 0, train: int | None = None) -> list[SimSite]:
    """Write (once per seed) and split the sites of a named scenario under ``out/<scenario>-seed<seed>/``.

    Each site's cases are drawn first (``imagesTr``/``labelsTr``), then its unlabelled pool
    (``imagesUn``) from the same random stream: the labelled cases do not depend on the pool.

    Args:
        train: every site gets this many training cases instead of the scenario's (``gcml simulate
            --active``: 2 labelled and a pool to label from); its own folder, ``<scenario>-train<N>-seed<seed>``.

    Raises:
        ValueError: an unknown scenario.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: found {scenario!r}; expected one of {sorted(SCENARIOS)}")
    plan = SCENARIOS[scenario]
    if train is not None:
        plan = [(style, train, n_val, n_test) for style, _, n_val, n_test in plan]
    root = Path(out) / (f"{scenario}-seed{seed}" if train is None else f"{scenario}-train{train}-seed{seed}")
    sites = []
    names = site_names([p[0].split("+")[0] for p in plan])
    for i, ((style, n_train, n_val, n_test), name) in enumerate(zip(plan, names)):
        n, n_un = n_train + n_val + n_test, (UNLABELLED_PER_TRAIN * n_train if train is None else 0)
        folder = root / name
        if (len(list((folder / "imagesTr").glob("*.nii.gz"))) != n
                or len(list((folder / "imagesUn").glob("*.nii.gz"))) != n_un):
            shutil.rmtree(folder, ignore_errors=True)
            main, _, second = style.partition("+")
            tmp = write_studies(root / f".tmp-{name}", main, cases=n + n_un, labelled=n, seed=seed * 1000 + i)
            other = second and write_studies(root / f".tmp-{name}-2", second, cases=n + n_un, labelled=n,
                                             seed=seed * 1000 + 500 + i)
            for sub in ("imagesTr", "labelsTr", "imagesUn"):
                (folder / sub).mkdir(parents=True)
            for k, img in enumerate(sorted(tmp.glob("*.nii.gz"))):
                src = other if other and k % MIX_EVERY == MIX_EVERY - 1 else tmp  # every 4th case: the second scanner
                if k < n:
                    shutil.move(str(src / img.name), folder / "imagesTr" / img.name)
                    shutil.move(str(src / "labels" / "final" / img.name), folder / "labelsTr" / img.name)
                else:
                    shutil.move(str(src / img.name), folder / "imagesUn" / img.name)
            shutil.rmtree(tmp)
            if other:
                shutil.rmtree(other)
        cases = _pairs(folder, "imagesTr", "labelsTr")
        sites.append(SimSite(name, train=cases[:n_train], val=cases[n_train:n_train + n_val],
                             test=cases[n_train + n_val:], unlabelled=_images(folder / "imagesUn")))
    return sites
