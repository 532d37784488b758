"""PNG image panels for the report: reference | prediction(s) | |difference| for one slice.

Display conventions (docs/evaluation.md):

* slices are shown in the **radiological** convention from the affine: axial — patient right on
  the image left, anterior at the top; coronal — right on the left, superior at the top;
  sagittal — anterior on the left, superior at the top. Each tile is resized (PIL ``BOX``: area
  average when shrinking, pixel replication when enlarging) so the longer physical side is
  ``tile`` pixels and pixels are square in millimetres.
* all grey tiles of a panel share one display window ``[lo, hi]`` -> black..white;
* ``|difference|`` tiles use a black-red-yellow-white ("hot") colormap from 0 to ``dmax``, one
  ``dmax`` per case shared by every method and slice (stated in the caption).

A panel is one PNG: a 14-pixel label strip on top, then the tiles left to right separated by
``GAP`` pixels; the tile boxes are returned so the report (and tests) can address each tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medldm.io.atomic import atomic_file

TILE = 256
GAP = 4
HEADER = 14
BACKGROUND = (32, 32, 32)

# dominant RAS world axis of the slice normal -> (column direction, row-downwards direction),
# each (world axis, sign) in RAS: 0 = R, 1 = A, 2 = S.
_SCREEN = {2: ((0, -1), (1, -1)),  # axial: columns towards patient left, rows towards posterior
           1: ((0, -1), (2, -1)),  # coronal: columns towards left, rows towards inferior
           0: ((1, -1), (2, -1))}  # sagittal: columns towards posterior, rows towards inferior
_EDGE = {2: ("R", "A"), 1: ("R", "S"), 0: ("A", "S")}  # (left edge, top edge) letters


def choose_slices(n: int, k: int, occupied: np.ndarray | None = None) -> list[int]:
    """``k`` slice indices out of ``n``: evenly spaced at fractions ``(i+1)/(k+1)`` of the occupied
    range (slices where ``occupied`` is True, e.g. the mask; else all), always including its centre."""
    if k <= 0 or n <= 0:
        return []
    lo, hi = 0, n - 1
    if occupied is not None and np.any(occupied):
        idx = np.flatnonzero(occupied)
        lo, hi = int(idx[0]), int(idx[-1])
    centre = (lo + hi) // 2
    pos = [int(round(lo + (hi - lo) * (i + 1) / (k + 1))) for i in range(k)]
    nearest = min(range(k), key=lambda i: abs(pos[i] - centre))
    pos[nearest] = centre
    return sorted(set(pos))


def display_plane(vol: np.ndarray, affine: np.ndarray, axis: int, index: int) -> tuple[np.ndarray, tuple[float, float], tuple[str, str]]:
    """Slice ``index`` along array ``axis`` of ``vol`` (X, Y, Z), oriented for display.

    Returns ``(plane (rows, cols), (row_mm, col_mm), (left_letter, top_letter))``. Oblique grids
    use the nearest world axes; when both in-plane axes point mostly along the same world axis,
    the array order is kept (rows = second in-plane axis) and the letters are ``"?"``.
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    inplane = [d for d in range(3) if d != axis]
    plane = np.take(np.asarray(vol), index, axis=axis)  # (n_inplane0, n_inplane1)
    dom = {d: int(np.argmax(np.abs(a[:, d]))) for d in inplane}
    normal = ({0, 1, 2} - set(dom.values())).pop() if len(set(dom.values())) == 2 else None
    if normal is None:
        img = plane.T
        return img, (float(np.linalg.norm(a[:, inplane[1]])), float(np.linalg.norm(a[:, inplane[0]]))), ("?", "?")
    (cw, cs), (rw, rs) = _SCREEN[normal]
    col_ax = next(d for d in inplane if dom[d] == cw)
    row_ax = next(d for d in inplane if dom[d] == rw)
    img = plane.T if row_ax == inplane[1] else plane
    if np.sign(a[cw, col_ax]) != cs:
        img = img[:, ::-1]
    if np.sign(a[rw, row_ax]) != rs:
        img = img[::-1, :]
    spacing = (float(np.linalg.norm(a[:, row_ax])), float(np.linalg.norm(a[:, col_ax])))
    return np.ascontiguousarray(img), spacing, _EDGE[normal]


def to_gray(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear window ``[lo, hi]`` -> uint8 0..255 (clipped)."""
    span = hi - lo if hi > lo else 1.0
    return (np.clip((np.asarray(plane, np.float64) - lo) / span, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_hot(diff: np.ndarray, dmax: float) -> np.ndarray:
    """``|difference|`` (rows, cols) -> RGB uint8 "hot" colormap: 0 black, dmax/3 red,
    2·dmax/3 yellow, >= dmax white."""
    t = np.clip(np.asarray(diff, np.float64) / (dmax if dmax > 0 else 1.0), 0, 1)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def tile_size(shape: tuple[int, int], spacing: tuple[float, float], tile: int = TILE) -> tuple[int, int]:
    """(width, height) in pixels with square millimetre pixels and the longer side = ``tile``."""
    h_mm, w_mm = shape[0] * spacing[0], shape[1] * spacing[1]
    f = tile / max(h_mm, w_mm)
    return max(1, int(round(w_mm * f))), max(1, int(round(h_mm * f)))


def render_panel(
    ref: np.ndarray,
    preds: list[tuple[str, np.ndarray]],
    *,
    window: tuple[float, float],
    dmax: float,
    spacing: tuple[float, float],
    diff_clip: tuple[float, float] | None = None,
    tile: int = TILE,
):
    """Compose one panel: ``ref`` and each prediction (rows, cols) in grey, then ``|pred - ref|``.

    ``diff_clip``: clip both images to this window before differencing (the metric window).
    Returns ``(PIL.Image RGB, tiles)``, ``tiles`` = ``[{"label", "kind", "box": [x0, y0, x1, y1]}]``.
    """
    size = tile_size(ref.shape, spacing, tile)
    items = [("reference", "reference", Image.fromarray(to_gray(ref, *window)).convert("RGB"))]
    for name, p in preds:
        items.append((name, "prediction", Image.fromarray(to_gray(p, *window)).convert("RGB")))
    for name, p in preds:
        a, b = np.asarray(p, np.float64), np.asarray(ref, np.float64)
        if diff_clip is not None:
            a, b = np.clip(a, *diff_clip), np.clip(b, *diff_clip)
        items.append((f"|{name} - ref|", "difference", Image.fromarray(to_hot(np.abs(a - b), dmax))))
    return compose_strip(items, size)


def compose_strip(items: list, size: tuple[int, int]):
    """Lay ``items`` (label, kind, PIL image) side by side, each resized to ``size`` under a label header.
    Returns ``(PIL.Image RGB, tiles)``, ``tiles`` = ``[{"label", "kind", "box": [x0, y0, x1, y1]}]``."""
    w, h = size
    canvas = Image.new("RGB", (len(items) * w + (len(items) - 1) * GAP, HEADER + h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    tiles = []
    for i, (label, kind, im) in enumerate(items):
        x0 = i * (w + GAP)
        canvas.paste(im.resize(size, Image.Resampling.BOX), (x0, HEADER))
        text = label if draw.textlength(label) <= w - 4 else label[: max(1, (w - 4) // 6)] + ".."
        draw.text((x0 + 2, 1), text, fill=(230, 230, 230))
        tiles.append({"label": label, "kind": kind, "box": [x0, HEADER, x0 + w, HEADER + h]})
    return canvas, tiles


def save_png(image, path: str | Path) -> Path:
    """Write a PIL image as PNG atomically."""
    path = Path(path)
    with atomic_file(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return path
