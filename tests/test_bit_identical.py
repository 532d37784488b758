"""Every shipped model gives the same outputs, bit for bit, as before the model-card / options refactor (issue 21).

The references (``tests/data/bit_identical/<model>.npz``) were recorded from the unmodified code (commit bf4fa9e)
with ``python tests/test_bit_identical.py --record``: each shipped model run on a small crop of a held-out real
scan (dipy's S0_10slices brain b0, which no shipped model was trained on), CPU, fixed seed. The enhancers run
through ``medldm.shipped.enhance`` (the Python entry point, 2 steps; the denoiser also with the other three
samplers, 3 steps) and ``medldm enhance`` (the CLI, NIfTI out, the model's default steps and sampler), the
synthesis models through ``Synthesizer.generate`` (2 steps) and ``medldm synthesize`` (the model's defaults).

Magnitude clamping (issue 20 item 7) may change voxels whose reference value is negative, and only those: the
comparison is exact on every voxel whose reference is >= 0, and the test reports how many were left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REF = Path(__file__).parent / "data" / "bit_identical"
ENHANCERS = {"mr-denoise-2d": {}, "mr-sr2x-2d": {}, "mr-thinslice-4x": {}}
SYNTH = ("mr-synth-2d", "mr-synth-mask-2d")
STEPS = 2


def _crop(name: str = ""):
    """40 x 40 x 3 centre crop of the held-out brain, in its scanner units (float32), with Gaussian noise
    (sigma 5 % of the range, fixed seed) so the denoiser has something to do; for the thin-slice model, slices
    4 x the in-plane pixel apart (what it takes)."""
    from monai.data import MetaTensor

    from medldm.io.reader import load_scan
    from medldm.samples import sample_path

    img = load_scan(sample_path("mr-brain-s0"))
    x0, y0, z0 = (int(s) // 2 for s in img.shape)
    arr = np.asarray(img[x0 - 20:x0 + 20, y0 - 20:y0 + 20, z0 - 1:z0 + 2], dtype=np.float32)
    rng = np.random.default_rng(0)
    arr = arr + rng.normal(0, 0.05 * float(arr.max() - arr.min()), arr.shape).astype(np.float32)
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([x0 - 20, y0 - 20, z0 - 1], dtype=np.float64)
    if name == "mr-thinslice-4x":
        affine[:3, 2] *= 4 * np.linalg.norm(affine[:3, 0]) / np.linalg.norm(affine[:3, 2])
    meta = {"original_dtype": "float32", "filename_or_obj": "held-out-crop"}
    return MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine), meta=meta)


def _mask() -> np.ndarray:
    """A 32 x 32 label map (background, and three nested squares of classes 1..3)."""
    m = np.zeros((32, 32), np.uint8)
    m[4:28, 4:28], m[8:24, 8:24], m[12:20, 12:20] = 1, 2, 3
    return m


def _enhance_api(name: str, **options) -> np.ndarray:
    from medldm.shipped import enhance

    options = {"seed": 0, "steps": STEPS, **options}
    return np.asarray(enhance(name, _crop(name), **options), dtype=np.float32)


def _enhance_cli(name: str, tmp: Path) -> np.ndarray:
    import nibabel as nib

    from medldm.cli import main
    from medldm.io.nifti import save_nifti

    src = tmp / "in.nii.gz"
    save_nifti(_crop(name), src)
    rc = main(["enhance", "-m", name, "-i", str(src), "-o", str(tmp / "out.nii.gz"), "--device", "cpu", "--quiet"])
    assert rc == 0
    out = tmp / "out.nii.gz"
    return np.asarray(nib.load(out).get_fdata(dtype=np.float32))


def _synth_api(name: str) -> np.ndarray:
    import medldm
    from medldm.pipelines.synthesize import Synthesizer

    syn = Synthesizer(medldm.load_model(name))
    kw = {"mask": torch.from_numpy(_mask())} if name == "mr-synth-mask-2d" else {"size": (32, 32)}
    label = None if name == "mr-synth-mask-2d" else 1
    img, _ = syn.generate(seed=3, label=label, steps=STEPS, **kw)
    return np.asarray(img, dtype=np.float32)


def _synth_cli(name: str, tmp: Path) -> np.ndarray:
    import nibabel as nib
    from monai.data import MetaTensor

    from medldm.cli import main
    from medldm.io.nifti import save_nifti

    args = ["synthesize", "-m", name, "-n", "1", "-o", str(tmp / "out"), "--seed", "3", "--device", "cpu", "--quiet"]
    if name == "mr-synth-mask-2d":
        save_nifti(MetaTensor(torch.from_numpy(_mask()[..., None]).float(), affine=torch.eye(4),
                              meta={"original_dtype": "uint8"}), tmp / "mask.nii.gz", dtype=np.uint8)
        args += ["--mask", str(tmp / "mask.nii.gz")]
    else:
        args += ["--size", "32,32", "--condition", "class=1"]
    assert main(args) == 0
    return np.asarray(nib.load(tmp / "out" / "synth_00000.nii.gz").get_fdata(dtype=np.float32))


def _outputs(name: str, tmp: Path) -> dict[str, np.ndarray]:
    if name in SYNTH:
        return {"api": _synth_api(name), "cli": _synth_cli(name, tmp)}
    outs = {"api": _enhance_api(name), "cli": _enhance_cli(name, tmp)}
    if name == "mr-denoise-2d":  # every sampler, and its time grid, on a flow model
        outs.update({f"api_{s}": _enhance_api(name, sampler=s, steps=3) for s in ("ddim", "dpmpp_2m", "unipc")})
    return outs


@pytest.mark.parametrize("name", [*ENHANCERS, *SYNTH])
def test_shipped_model_outputs_bit_identical(name, tmp_path):
    ref = np.load(REF / f"{name}.npz")
    got = _outputs(name, tmp_path)
    for key, out in got.items():
        want = ref[key]
        assert out.shape == want.shape, f"{name} {key}: shape {out.shape} != reference {want.shape}"
        keep = ~(want < 0)  # NaN compares through array_equal(equal_nan); negative voxels may be clamped
        assert np.array_equal(out[keep], want[keep], equal_nan=True), (
            f"{name} {key}: {int((out[keep] != want[keep]).sum())} of {int(keep.sum())} voxels differ "
            f"(max |diff| {float(np.nanmax(np.abs(out[keep] - want[keep]))):.3g})")
        assert np.isfinite(out).all() and out.std() > 0, f"{name} {key}: a constant or non-finite output"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    REF.mkdir(parents=True, exist_ok=True)
    for n in [*ENHANCERS, *SYNTH]:
        with tempfile.TemporaryDirectory() as d:
            outs = _outputs(n, Path(d))
        np.savez_compressed(REF / f"{n}.npz", **outs)
        print(n, {k: (v.shape, float(v.min()), float(v.max()), int((v < 0).sum())) for k, v in outs.items()})
