"""Fréchet Radiomics Distance (FRD) of synthetic vs real images, with a real-vs-real reference and a per-feature
breakdown (docs/audit.md, "Radiomics").

FRD (Konz, Osuala et al., arXiv 2412.01496; Medical Image Analysis 2026) is computed by its authors' package
``frd-score`` (PyPI, imported as ``frd_score``), which extracts pyradiomics features (v1 defaults: first-order
intensity and GLCM/GLRLM/GLSZM/NGTDM texture of the original image and its wavelet sub-bands; its LoG filters gave
no features on 2D images here; 396 features per 2D image), z-scores them by the *real* set
(``norm_ref='d1'``) and reports ``log(d_F^2)``, the log of the squared Fréchet distance of the two feature
Gaussians. Everything runs offline: no weights are downloaded.

Install: ``pip install 'medldm[radiomics]'``. pyradiomics has no wheel for Python >= 3.10 on PyPI and its source
distribution does not declare its build requirements, so pip's isolated build fails ("No module named numpy",
then "versioneer"); install them first and build without isolation::

    pip install numpy versioneer SimpleITK pywavelets pykwalify
    pip install --no-build-isolation pyradiomics frd-score

Without it the audit reports ``skipped`` with that line and everything else still runs.

``radiomics_frd(real, real_subjects, synthetic)``: 2D images (S, S) in [0, 1] on the audit grid; each is
measured inside its foreground (> 0.05; the whole image when that is empty). The reference is the FRD between two
halves of the real set split **by subject** (``real_subjects``: scans of one subject never in both halves): a
synthetic set whose FRD is near it is as close to the real set as real data of other subjects. The breakdown gives
each feature's standardized mean difference (Cohen's d: synthetic mean - real mean, over the pooled
standard deviation) beside the
same between the real halves, largest first, and the median per group (intensity, texture, shape) and filter.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

INSTALL = ("pip install numpy versioneer SimpleITK pywavelets pykwalify && "
           "pip install --no-build-isolation pyradiomics frd-score")
# FRD v1's 2D feature set has no shape class: only the mask's voxel count (a diagnostics value) measures size
_GROUPS = {"firstorder": "intensity", "glcm": "texture", "glrlm": "texture", "glszm": "texture",
           "gldm": "texture", "ngtdm": "texture", "shape": "shape", "diagnostics": "intensity"}


def missing() -> str | None:
    """Why FRD cannot run here (None when it can)."""
    try:
        import frd_score  # noqa: F401
        import radiomics  # noqa: F401
    except ImportError as e:
        return f"frd-score / pyradiomics not installed ({e.name}): {INSTALL}"
    return None


def feature_group(name: str) -> tuple[str, str]:
    """(group, filter) of a pyradiomics feature name such as ``wavelet-LH_glcm_Contrast``."""
    low = name.lower()
    group = next((g for k, g in _GROUPS.items() if f"{k}" in low), "other")
    filt = "log" if low.startswith("log") else "wavelet" if low.startswith("wavelet") else "original"
    return group, filt


def _write(images: list[np.ndarray], folder: Path) -> tuple[list[str], list[str]]:
    import nibabel as nib

    folder.mkdir(parents=True)
    files, masks = [], []
    for i, img in enumerate(images):
        img = np.asarray(img, np.float32)
        fg = (img > 0.05).astype(np.uint8)
        if fg.sum() < 16:
            fg[:] = 1
        fg[0, 0] = 0  # pyradiomics refuses a mask without background (its issue 765)
        f, m = folder / f"i{i:05d}.nii.gz", folder / f"m{i:05d}.nii.gz"
        nib.save(nib.Nifti1Image(img * 255.0, np.eye(4)), str(f))
        nib.save(nib.Nifti1Image(fg, np.eye(4)), str(m))
        files.append(str(f))
        masks.append(str(m))
    return files, masks


def _frd(a: tuple[list[str], list[str]], b: tuple[list[str], list[str]]) -> tuple[float, np.ndarray, np.ndarray,
                                                                                   list[str]]:
    """(FRD, features of a, features of b, names) by frd-score v1 (a is the normalization reference)."""
    from frd_score import frd

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    ext = frd.get_feature_extractor(frd_version="v1", image_dim=2)
    mu, sigma, feats, names = frd.compute_statistics_of_paths(
        [a[0], b[0]], frd.V1_DEFAULT_NORM_TYPE, frd.V1_DEFAULT_NORM_RANGE, ext, paths_mask=[a[1], b[1]],
        norm_ref="d1", num_workers=1, frd_version="v1")
    d2 = float(frd.calculate_frechet_distance(mu[0], sigma[0], mu[1], sigma[1]))
    return (float(np.log(d2)) if d2 > 0 else float("-inf")), np.asarray(feats[0]), np.asarray(feats[1]), list(names)


def _effect(real: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Standardized mean difference per feature (Cohen's d): (mean other - mean real) / pooled sd (0 where the
    pooled sd is 0)."""
    sd = np.sqrt((real.var(axis=0, ddof=1) + other.var(axis=0, ddof=1)) / 2)
    diff = other.mean(axis=0) - real.mean(axis=0)
    return np.where(sd > 0, diff / np.where(sd > 0, sd, 1.0), 0.0)


def subject_halves(subjects: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two halves of the images, split by subject (shuffled by ``seed``)."""
    uniq = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(uniq))
    first = {uniq[i] for i in order[: len(uniq) // 2]}
    a = np.array([i for i, s in enumerate(subjects) if s in first], dtype=int)
    b = np.array([i for i, s in enumerate(subjects) if s not in first], dtype=int)
    return a, b


def radiomics_frd(real: list[np.ndarray], real_subjects: list[str], synthetic: list[np.ndarray], *,
                  seed: int = 0, top: int = 12) -> dict:
    """FRD of ``synthetic`` vs ``real``, the real-halves reference and the per-feature breakdown (module doc)."""
    why = missing()
    if why:
        return {"skipped": why}
    if real[0].ndim != 2:
        return {"skipped": "radiomics FRD is measured on 2D images only (3D: not implemented)"}
    if len(real) < 4 or len(synthetic) < 2:
        return {"skipped": f"needs >= 4 real and >= 2 synthetic images (got {len(real)}, {len(synthetic)})"}
    with tempfile.TemporaryDirectory(prefix="medldm-frd-") as tmp:
        r = _write(real, Path(tmp) / "real")
        s = _write(synthetic, Path(tmp) / "syn")
        value, fr, fs, names = _frd(r, s)
        out = {"frd": value, "n_real": len(real), "n_synthetic": len(synthetic), "n_features": len(names),
               "definition": "frd-score v1: log of the squared Fréchet distance of pyradiomics features "
                             "(original + wavelet; the config also lists LoG), z-scored by the real set"}
        a, b = subject_halves(real_subjects, seed)
        ref_eff = None
        if len(a) >= 2 and len(b) >= 2:
            ra = ([r[0][i] for i in a], [r[1][i] for i in a])
            rb = ([r[0][i] for i in b], [r[1][i] for i in b])
            ref, fa, fb, ref_names = _frd(ra, rb)
            out["real_halves_reference"] = ref
            out["reference_subjects"] = [len({real_subjects[i] for i in a}), len({real_subjects[i] for i in b})]
            if ref_names == names:
                ref_eff = _effect(fa, fb)
        else:
            out["real_halves_reference"] = None
            out["reference_note"] = (f"{len(set(real_subjects))} real subject(s): two halves by subject need at "
                                     "least 2 images on each side")
    eff = _effect(fr, fs)
    order = np.argsort(-np.abs(eff))
    out["features"] = [{"name": names[i], "group": feature_group(names[i])[0], "filter": feature_group(names[i])[1],
                        "effect": float(eff[i]),
                        "real_halves_effect": None if ref_eff is None else float(ref_eff[i])} for i in order[:top]]
    groups: dict[str, dict] = {}
    for key, idx in _group_index(names).items():
        groups[key] = {"n": len(idx), "median_abs_effect": float(np.median(np.abs(eff[idx]))),
                       "real_halves_median_abs_effect": None if ref_eff is None else
                       float(np.median(np.abs(ref_eff[idx])))}
    out["groups"] = groups
    return out


def _group_index(names: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        g, f = feature_group(n)
        out.setdefault(g, []).append(i)
        out.setdefault(f"{g} / {f}", []).append(i)
    return dict(sorted(out.items()))
