"""Write the extra training scans of the shipped MR models as NIfTI files (read by ``medldm train``).

The shipped sr/denoise models train on every real MR volume the registry packages ship that is NOT a
``medldm demo`` scan or a validation scan (docs/models.md). Most of them are already files ``medldm`` reads
(``pkg://`` paths in ``configs/shipped/*.yaml``); this script converts the rest once:

* heudiconv's Siemens mosaics (``b0dwiForFmap`` x3: a 152 x 150 x 81 brain at 1.5 mm; ``axasc35``: 64 x 64 x 35),
  which medldm's reader refuses, unpacked by ``nibabel.nicom.dicomwrappers`` (their own affine);
* heudiconv's multi-frame MR (162 x 162 x 3) and its field-map (64 x 64);
* nibabel's ``example4d`` (fMRI, first volume), dipy's ``t1_coronal_slice.npy`` (one 256 x 256 T1 slice);
* optionally (``--natural``) a few grey-level natural images that scikit-image ships, cut into 128 x 128 tiles
  (at most 8 per image), as generic texture for the restoration networks (a common augmentation for denoisers and SR networks trained on little data).

Needs ``pip install --no-deps heudiconv`` (data only; its dependencies are not needed).

    python tools/prepare_shipped_data.py -o runs/shipped_data [--natural]
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

NATURAL = ["astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "grass", "gravel", "brick",
           "hubble_deep_field", "cell", "retina", "immunohistochemistry"]
TILE, MAX_TILES = 128, 8


def _tiles(img: np.ndarray, size: int, most: int) -> np.ndarray:
    """Up to ``most`` non-overlapping ``size`` x ``size`` tiles of a 2D image, stacked (size, size, n): each
    becomes a training slice, so a large image weighs like several MR slices, not one."""
    nx, ny = img.shape[0] // size, img.shape[1] // size
    tiles = [img[i * size:(i + 1) * size, j * size:(j + 1) * size] for i in range(nx) for j in range(ny)]
    step = max(1, len(tiles) // most)
    return np.stack(tiles[::step][:most], axis=-1)


def _pkg(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed (pip install --no-deps {name})")
    return Path(list(spec.submodule_search_locations)[0])


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    arr = np.asarray(arr, dtype=np.float32)
    while arr.ndim < 3:
        arr = arr[..., None]
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    print(f"{path.name}: {arr.shape}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", default="runs/shipped_data")
    ap.add_argument("--natural", action="store_true", help="also write grey-level natural images (scikit-image)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from nibabel.nicom import dicomwrappers as dw

    heu = _pkg("heudiconv") / "tests" / "data"
    dicoms = sorted((heu / "b0dwiForFmap").glob("*.dcm")) + [heu / "axasc35.dcm"]
    dicoms += sorted(heu.glob("MRI_102TD*.dcm")) + sorted((heu / "01-fmap_acq-3mm").glob("*.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in dicoms:
            w = dw.wrapper_from_file(str(f))
            _save(w.get_data(), w.affine, out / f"heudiconv_{f.stem.replace('+', '_')[:40]}.nii.gz")
    ex4d = nib.load(str(_pkg("nibabel") / "tests" / "data" / "example4d.nii.gz"))
    _save(np.asarray(ex4d.dataobj[..., 0]), ex4d.affine, out / "nibabel_example4d_vol0.nii.gz")
    t1 = np.load(_pkg("dipy") / "data" / "files" / "t1_coronal_slice.npy")
    _save(t1, np.eye(4), out / "dipy_t1_coronal_slice.nii.gz")
    if a.natural:
        import skimage.data
        from skimage.color import rgb2gray

        for name in NATURAL:
            try:
                img = getattr(skimage.data, name)()
            except Exception as e:  # noqa: BLE001 - an image that needs a download is skipped
                print(f"skip {name}: {type(e).__name__}")
                continue
            img = (rgb2gray(img[..., :3]) if img.ndim == 3 else img.astype(np.float32)).T
            _save(_tiles(img, TILE, MAX_TILES), np.eye(4), out / f"natural_{name}.nii.gz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
