"""Label maps with new anatomy (issue 23 item 3): real MNI152 tissue labels from nilearn's GM/WM probability maps,
and random smooth deformations / scalings / flips of real maps that the audit's copy test does not flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medldm.data.labelmaps import deform_labels, mni_tissue_labels, new_label_maps


@pytest.fixture(scope="module")
def mni():
    pytest.importorskip("nilearn")
    return mni_tissue_labels()


def _grid(lab: np.ndarray, size: int = 64) -> np.ndarray:
    t = torch.from_numpy(lab[None, None].astype(np.float32))
    return torch.nn.functional.interpolate(t, size=(size, size), mode="nearest")[0, 0].long().numpy()


def test_mni_labels_are_tissue_classes(mni):
    """0 background, 1 other head tissue, 2 GM, 3 WM; on the T1 template WM is brighter than GM and both than
    the background; GM and WM each cover a plausible share of an axial slice through the ventricles."""
    lab, t1, affine = mni
    assert lab.shape == t1.shape == (197, 233, 189) and affine.shape == (4, 4)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    means = [float(t1[lab == c].mean()) for c in range(4)]
    assert means[3] > means[2] > means[0] and means[1] > means[0]
    sl = lab[:, :, 100]
    share = [(sl == c).mean() for c in range(4)]
    assert 0.05 < share[2] < 0.4 and 0.05 < share[3] < 0.4, share


def test_deformed_maps_are_new_but_anatomical(mni):
    """Maps made from 4 real slices: deterministic per index, only the source labels, each tissue class kept, and
    not flagged by the audit's copy test against the source maps (NN SSIM <= 0.95 and NCC <= 0.98, the audit's
    floors; shifts and flips tolerated), while an exact or flipped copy is flagged."""
    from medldm.eval.audit_match import nearest_neighbours

    lab = mni[0]
    sources = [_grid(lab[:, :, z]) for z in (70, 85, 100, 115)]
    maps = list(new_label_maps(sources, 8, seed=3))
    again = dict(enumerate(m for _, m in new_label_maps(sources, 3, seed=3)))
    assert all(np.array_equal(again[i], maps[i][1]) for i in range(3))  # map i does not depend on n
    for src, m in maps:
        assert m.shape == sources[src].shape and set(np.unique(m)) <= set(np.unique(sources[src]))
        assert {2, 3} <= set(np.unique(m))
        dice = [2 * ((m == c) & (sources[src] == c)).sum() / ((m == c).sum() + (sources[src] == c).sum())
                for c in (1, 2, 3)]
        assert np.nanmin(dice) < 0.95  # changed (class 1 is rare on the skull-stripped template: may be absent)
    as_img = lambda ms: torch.from_numpy(np.stack(ms).astype(np.float32) / 3)[:, None]  # noqa: E731
    refs = as_img(sources)
    new = nearest_neighbours(as_img([m for _, m in maps]), refs)
    copies = nearest_neighbours(as_img([sources[0], sources[1][::-1].copy()]), refs)
    assert all(c.ssim > 0.95 or c.ncc > 0.98 for c in copies)
    assert all(m.ssim <= 0.95 and m.ncc <= 0.98 for m in new), [(m.ssim, m.ncc) for m in new]


def test_deform_works_in_3d_and_checks_its_settings():
    lab = np.zeros((16, 16, 16), dtype=np.int64)
    lab[4:12, 4:12, 4:12] = 2
    out = deform_labels(lab, np.random.default_rng(0))
    assert out.shape == lab.shape and set(np.unique(out)) <= {0, 2} and (out == 2).sum() > 100
    with pytest.raises(ValueError, match="2D or 3D"):
        deform_labels(np.zeros(5), np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_shift"):
        deform_labels(lab, np.random.default_rng(0), max_shift=0.7)
