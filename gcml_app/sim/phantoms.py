"""Synthetic multi-site 3D phantoms: an organ with a lesion, in a body, seen by different scanners.

Each site style changes what real sites change (non-IID): intensity scale and offset, organ/lesion
contrast, noise, a smooth multiplicative bias field, voxel spacing and the lesion size distribution;
and, for ``modality-shift``, an inverted (T2-like) contrast and a CT-like range (air at -1000).
Labels: ``organ`` = 1, ``lesion`` = 2 (the lesion lies inside the organ).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["LABELS", "STYLES", "SiteStyle", "make_case", "write_dicom_studies", "write_studies"]

LABELS = {"organ": 1, "lesion": 2}


@dataclass(frozen=True)
class SiteStyle:
    """How one site's scanner and population look."""

    scale: float  # intensity of the organ
    offset: float  # intensity added everywhere
    lesion_contrast: float  # lesion intensity relative to organ (1.0 = invisible)
    noise: float  # Gaussian noise std, relative to ``scale``
    bias: float  # amplitude of the smooth multiplicative bias field
    spacing: tuple[float, float, float]  # mm, (z, y, x) as the arrays
    lesion_radius: tuple[float, float]  # voxels, uniform range
    body: float = 0.35  # intensity of the body around the organ, relative to the organ (before scale)
    background: float = 0.0  # intensity outside the body, likewise (CT's air: -10 with scale 100 is -1000)
    invert: bool = False  # tissue contrast inverted inside the body: organ darker than body, lesion darker still


# ``semantic-shift`` (the first sample federation): style b's lesion is *darker* than its organ while
# a's and c's are brighter, and lesion sizes differ: a change of what the label looks like, not only
# of the scanner.
STYLES: dict[str, SiteStyle] = {
    "a": SiteStyle(scale=100.0, offset=0.0, lesion_contrast=1.8, noise=0.10, bias=0.05,
                   spacing=(1.0, 1.0, 1.0), lesion_radius=(3.0, 5.0)),
    "b": SiteStyle(scale=800.0, offset=-200.0, lesion_contrast=0.45, noise=0.18, bias=0.20,
                   spacing=(1.25, 1.25, 1.5), lesion_radius=(2.5, 4.0)),
    "c": SiteStyle(scale=40.0, offset=20.0, lesion_contrast=1.4, noise=0.25, bias=0.12,
                   spacing=(0.8, 0.8, 1.0), lesion_radius=(4.0, 6.5)),
    # ``few-labels``: one anatomy process and label meaning (a lesion brighter than its organ, the same
    # size distribution); only the scanner differs: intensity range, contrast, noise, bias, resolution.
    "s1": SiteStyle(scale=100.0, offset=0.0, lesion_contrast=1.6, noise=0.10, bias=0.05,
                    spacing=(1.0, 1.0, 1.0), lesion_radius=(3.0, 5.0)),
    "s2": SiteStyle(scale=400.0, offset=-300.0, lesion_contrast=1.4, noise=0.15, bias=0.10,
                    spacing=(1.25, 1.25, 1.5), lesion_radius=(3.0, 5.0)),
    "s3": SiteStyle(scale=40.0, offset=20.0, lesion_contrast=1.8, noise=0.22, bias=0.20,
                    spacing=(0.8, 0.8, 1.0), lesion_radius=(3.0, 5.0)),
    "s4": SiteStyle(scale=1500.0, offset=0.0, lesion_contrast=1.3, noise=0.18, bias=0.15,
                    spacing=(1.0, 1.0, 1.25), lesion_radius=(3.0, 5.0)),
    "s5": SiteStyle(scale=10.0, offset=5.0, lesion_contrast=1.5, noise=0.25, bias=0.25,
                    spacing=(1.1, 1.1, 1.1), lesion_radius=(3.0, 5.0)),
    # ``gcml simulate --init pretrained``: the separate site a "pretrained bundle" was trained at (the
    # public dataset of a Model Zoo bundle): the same anatomy, a scanner none of the sites has.
    "p": SiteStyle(scale=200.0, offset=50.0, lesion_contrast=1.5, noise=0.15, bias=0.10,
                   spacing=(1.0, 1.0, 1.2), lesion_radius=(3.0, 5.0)),
    # ``modality-shift``: what no intensity rescaling bridges. ``t2``: tissue contrast inverted (body
    # bright, organ darker, lesion darkest), as T2 against T1; ``ct``: a CT range (air -1000, body 40,
    # organ 100, lesion 130 HU), little bias field, and half the z-resolution.
    "t2": SiteStyle(scale=300.0, offset=0.0, lesion_contrast=1.2, noise=0.15, bias=0.15,
                    spacing=(1.0, 1.0, 1.2), lesion_radius=(3.0, 5.0), invert=True),
    "ct": SiteStyle(scale=100.0, offset=0.0, lesion_contrast=1.3, noise=0.15, bias=0.02,
                    spacing=(2.0, 0.9, 0.9), lesion_radius=(3.0, 5.0), body=0.4, background=-10.0),
}


def make_case(style: SiteStyle, rng: np.random.Generator, shape: tuple[int, int, int] = (32, 32, 32)):
    """One phantom.

    Returns:
        ``(image, label)`` float32 and uint8 arrays of ``shape`` (z, y, x order, as SimpleITK arrays).
    """
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = np.array(shape, dtype=np.float32) / 2

    def ellipsoid(c, r):
        return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1.0

    body = ellipsoid(centre, np.array(shape) * 0.45)
    organ_c = centre + rng.uniform(-2, 2, size=3)
    organ_r = np.array(shape) * rng.uniform(0.22, 0.3, size=3)
    organ = ellipsoid(organ_c, organ_r) & body
    lesion_r = rng.uniform(*style.lesion_radius)
    # Keep the lesion inside the organ: offset at most half the spare radius per axis.
    spare = np.maximum(organ_r - lesion_r, 0.5)
    lesion_c = organ_c + rng.uniform(-0.5, 0.5, size=3) * spare
    lesion = ellipsoid(lesion_c, np.full(3, lesion_r)) & organ

    label = np.zeros(shape, np.uint8)
    label[organ] = LABELS["organ"]
    label[lesion] = LABELS["lesion"]

    img = np.where(body, style.body, style.background).astype(np.float32)
    img[organ] = 1.0
    img[lesion] = style.lesion_contrast
    if style.invert:  # inside the body v -> 1 + body - v: body 1, organ `body`, lesion darker still
        img = np.where(body, 1.0 + style.body - img, img)
    g = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    w = rng.normal(size=3).astype(np.float32)
    bias = 1.0 + style.bias * np.tanh(w[0] * g[0][:, None, None] + w[1] * g[1][None, :, None] + w[2] * g[2][None, None, :])
    img = img * bias + rng.normal(0, style.noise, size=shape).astype(np.float32)
    return (img * style.scale + style.offset).astype(np.float32), label


def _write(arr: np.ndarray, spacing, path: Path) -> None:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(im, str(path), useCompression=True)


def write_studies(
    out: str | Path,
    style: str = "a",
    cases: int = 10,
    labelled: int | None = None,
    seed: int = 0,
    shape: tuple[int, int, int] = (32, 32, 32),
) -> Path:
    """Write a MONAI Label studies folder: ``case_XXX.nii.gz`` and ``labels/final/case_XXX.nii.gz``.

    Args:
        out: the studies folder (created).
        style: site style, one of :data:`STYLES`.
        cases: number of images.
        labelled: how many of them (the first ones) get a final label; default all.
        seed: random seed; the same arguments always write the same volumes.

    Returns:
        the studies folder.
    """
    if style not in STYLES:
        raise ValueError(f"site style {style!r} unknown; expected one of {sorted(STYLES)}")
    if cases < 1:
        raise ValueError(f"cases: found {cases}; expected at least 1")
    labelled = cases if labelled is None else labelled
    if not 0 <= labelled <= cases:
        raise ValueError(f"labelled: found {labelled}; expected between 0 and cases={cases}")
    out = Path(out)
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    st = STYLES[style]
    rng = np.random.default_rng([seed, *map(ord, style)])
    for i in range(cases):
        img, lab = make_case(st, rng, shape)
        name = f"case_{i:03d}.nii.gz"
        # SimpleITK arrays are (z, y, x); spacing is given (x, y, z).
        _write(img, st.spacing[::-1], out / name)
        if i < labelled:
            _write(lab, st.spacing[::-1], out / "labels" / "final" / name)
    return out


def write_dicom_studies(
    out: str | Path,
    style: str = "a",
    cases: int = 10,
    labelled: int | None = None,
    seed: int = 0,
    modality: str = "CT",
) -> Path:
    """The same phantoms as :func:`write_studies`, as a PACS holds them.

    Writes ``case_XXX/`` (one DICOM file per slice, one study per case, patient ``GCML-XXX``) and,
    for the first ``labelled`` cases, ``case_XXX_seg.dcm`` (DICOM SEG referencing that series, one
    segment per label, named as in :data:`LABELS`). Load them with ``gcml pacs-load``.

    Returns:
        the folder.
    """
    from gcml_app.site.dicom import check_series, write_seg, write_series

    with tempfile.TemporaryDirectory(prefix="gcml-phantoms-") as tmp:
        nifti = write_studies(Path(tmp) / "studies", style, cases, labelled, seed)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for image in sorted(nifti.glob("case_*.nii.gz")):
            name = image.name.removesuffix(".nii.gz")
            write_series(sitk.ReadImage(str(image)), out / name, modality=modality, patient_id=f"GCML-{name[5:]}",
                         description=f"GCML phantom {style} {name}")
            label = nifti / "labels" / "final" / image.name
            if label.exists():
                write_seg(sitk.ReadImage(str(label)), check_series(out / name), LABELS, out / f"{name}_seg.dcm")
    return out
