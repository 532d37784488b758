"""Stack 2D DICOM images (files of a series, or frames of a multi-frame object) into one volume.

Order is by the projection of ImagePositionPatient on the slice normal ``row_cos x col_cos`` (never
by file name or InstanceNumber); the slice step comes from those positions. Integrity problems go
to ``warnings`` (human lines) and ``integrity`` (a dict): small non-uniform spacing with the max
deviation in mm, small orientation differences, gantry tilt (sheared grid), dropped duplicates.

A real slice is never put at a wrong position: slices that do not lie on one regular grid are not
stacked. :func:`regular_runs` splits a stack at gaps (missing slices) into regular runs (discovery
makes one case of each); :func:`stack` refuses a gap or an irregular grid with a :class:`CaseError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from medldm.io.dicom import SliceGeom, affine_lps, exact_dtype_from_stats
from medldm.io.errors import CaseError
from medldm.io.geometry import lps_to_ras
from medldm.io.limits import max_voxels

ORIENT_SPLIT_TOL = 1e-3  # max |cosine difference| still treated as one stack
ORIENT_WARN_TOL = 1e-4  # above this, one stack but a warning
SPACING_REL_TOL = 0.01  # steps within 1 % (or 0.01 mm) of the median are uniform
TILT_WARN_DEG = 0.05
GAP_FACTOR = 1.5  # a step > 1.5 x the regular step is a gap (missing slices)
GRID_REFUSE_FRAC = 0.05  # a slice more than 5 % of the step (and 0.01 mm) off the regular grid: refused
MAX_PARTS = 8  # more regular runs than this: not a volume with a few gaps, refused


@dataclass
class Frame:
    """One 2D image to stack. ``pixels()`` returns ``(values (rows, cols), stored dtype, rescaled)``."""

    source: str
    geom: SliceGeom
    shape: tuple[int, int]
    pixels: Callable[[], tuple[np.ndarray, np.dtype, bool]]
    uid: str = ""
    tiebreak: tuple = ()  # orders frames sharing one position (echoes, time points)


@dataclass
class Stacked:
    """A volume ``data`` (X, Y, Z) float32, its RAS affine and what was found on the way."""

    data: np.ndarray
    affine: np.ndarray
    original_dtype: str
    warnings: list[str] = field(default_factory=list)
    integrity: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _orient(f: Frame) -> np.ndarray | None:
    g = f.geom
    return None if g.row_cos is None else np.concatenate([g.row_cos, g.col_cos])


def split_stacks(frames: Sequence[Frame]) -> list[list[Frame]]:
    """Group frames that can form one volume: same image size and orientation (within 1e-3)."""
    groups: list[tuple[tuple, np.ndarray | None, list[Frame]]] = []
    for f in frames:
        o = _orient(f)
        for shape, ref, members in groups:
            if shape != f.shape:
                continue
            if (ref is None) != (o is None):
                continue
            if ref is None or np.max(np.abs(ref - o)) <= ORIENT_SPLIT_TOL:
                members.append(f)
                break
        else:
            groups.append((f.shape, o, [f]))
    return [g[2] for g in groups]


def describe_stacks(stacks: list[list[Frame]]) -> str:
    """``"3 stacks: 16x16 axial-ish (3 images), ..."`` for error messages."""
    parts = []
    for s in stacks:
        o = _orient(s[0])
        ori = "no orientation" if o is None else "orientation " + " ".join(f"{v:.2f}" for v in o)
        parts.append(f"{s[0].shape[1]}x{s[0].shape[0]} {ori} ({len(s)} image{'s' * (len(s) > 1)})")
    return f"{len(stacks)} stacks: " + "; ".join(parts)


def _drop_duplicate_uids(frames: list[Frame], warns: list[str]) -> list[Frame]:
    seen: dict[str, Frame] = {}
    out = []
    for f in frames:
        if f.uid and f.uid in seen:
            warns.append(f"duplicate image {f.source} (same SOPInstanceUID as {seen[f.uid].source}): ignored")
            continue
        if f.uid:
            seen[f.uid] = f
        out.append(f)
    return out


def _position_groups(d: np.ndarray, tol: float) -> tuple[np.ndarray, list[list[int]]]:
    """(order ascending along the normal, groups of frame indices at one position within ``tol`` mm)."""
    order = np.argsort(d, kind="stable")
    groups: list[list[int]] = []
    for idx in order:
        if groups and abs(d[idx] - d[groups[-1][0]]) <= tol:
            groups[-1].append(int(idx))
        else:
            groups.append([int(idx)])
    return order, groups


def _select_volume(frames: list[Frame], d: np.ndarray, tol: float, volume: int | None, where: str,
                   warns: list[str]) -> tuple[list[Frame], np.ndarray]:
    """Handle several frames at one position: a 4D series (choose ``volume``) or an error."""
    order, groups = _position_groups(d, tol)
    counts = {len(g) for g in groups}
    if counts == {1}:
        if volume not in (None, 0):
            warns.append(f"volume {volume} requested but the series holds one volume: ignored")
        return [frames[i] for i in order], d[order]
    if len(counts) > 1:
        dup = sum(len(g) > 1 for g in groups)
        raise CaseError(where, f"{dup} slice positions hold more than one image, unevenly "
                               f"({min(counts)}-{max(counts)} images per position)",
                        "the folder mixes acquisitions; keep one acquisition per folder")
    n_vol = counts.pop()
    if volume is None:
        raise CaseError(where, f"4D series: {len(frames)} images at {len(groups)} positions "
                               f"({n_vol} volumes: echoes or time points)",
                        f"pass --volume K (0..{n_vol - 1}) to pick one volume")
    if not 0 <= volume < n_vol:
        raise CaseError(where, f"volume {volume} out of range: the series holds {n_vol} volumes",
                        f"pass --volume K with 0 <= K < {n_vol}")
    picked = [sorted(g, key=lambda i: frames[i].tiebreak)[volume] for g in groups]
    warns.append(f"4D series ({n_vol} volumes): volume {volume} selected")
    return [frames[i] for i in picked], d[picked]


def volume_count(frames: Sequence[Frame]) -> int:
    """Images per slice position of ONE series' frames (a 4D series' volumes), 1 when every position holds one image,
    the frames span several stacks (orientations, sizes) or the counts are uneven (the read says why)."""
    frames = list(frames)
    if len(split_stacks(frames)) != 1:
        return 1
    d = _positions(frames)
    if d is None:
        return 1
    counts = {len(g) for g in _position_groups(d, _position_tol(frames))[1]}
    return counts.pop() if len(counts) == 1 else 1


def volume_groups(frames: Sequence[Frame]) -> list[list[int]]:
    """Frame indices of each volume of a 4D series (in volume order, each ascending along the normal): the k-th
    image (by time point, acquisition, echo, trigger, instance) of every position, as ``stack(volume=k)`` picks."""
    frames = list(frames)
    d = _positions(frames)
    if d is None:
        return [list(range(len(frames)))]
    _, groups = _position_groups(d, _position_tol(frames))
    n = len(groups[0])
    return [[sorted(g, key=lambda i: frames[i].tiebreak)[k] for g in groups] for k in range(n)]


def _positions(frames: Sequence[Frame]) -> np.ndarray | None:
    """Position of each frame along the first frame's normal (None without full geometry)."""
    if not frames or not all(f.geom.position is not None and f.geom.row_cos is not None for f in frames):
        return None
    n = frames[0].geom.normal
    return np.array([float(f.geom.position @ n) for f in frames])


def _position_tol(frames: Sequence[Frame]) -> float:
    return max(1e-3 * min(frames[0].geom.spacing), 1e-3)


def _name(source: str) -> str:
    """Short file name for messages (``IM0001`` or ``file.dcm#frame3``)."""
    return source.replace("\\", "/").rsplit("/", 1)[-1]


def regular_step(u: np.ndarray) -> float:
    """The regular step of sorted unique positions ``u``: the median of the steps close to the
    smallest one (so a gap does not inflate it)."""
    steps = np.diff(u)
    return float(np.median(steps[steps <= GAP_FACTOR * steps.min()]))


def _gap_lines(u: np.ndarray, names: list[str], base: float) -> list[dict]:
    gaps = []
    for k, s in enumerate(np.diff(u)):
        if s > GAP_FACTOR * base:
            gaps.append({"after_mm": round(float(u[k]), 4), "before_mm": round(float(u[k + 1]), 4),
                         "gap_mm": round(float(s), 4), "step_mm": round(base, 6),
                         "missing": max(int(round(s / base)) - 1, 1),
                         "after_file": names[k], "before_file": names[k + 1]})
    return gaps


def describe_gap(g: dict) -> str:
    m = g["missing"]
    return (f"gap of {g['gap_mm']:.4g} mm between the slices at {g['after_mm']:.2f} mm ({g['after_file']}) and "
            f"{g['before_mm']:.2f} mm ({g['before_file']}) along the slice normal, about {m} slice"
            f"{'s' * (m != 1)} of {g['step_mm']:.4g} mm missing")


def fit_grid(u: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Least-squares regular grid through sorted positions ``u`` (position against index): ``(first position,
    step, residuals)``. Scanners round positions (a GE series steps 6.958-7.071 mm around a 7.0 mm grid), so the
    grid is fitted to all slices rather than built from the first slice and the median step, which drifts."""
    k = np.arange(u.size, dtype=np.float64)
    step, first = np.polyfit(k, u.astype(np.float64), 1)
    return float(first), float(step), u - (first + step * k)


def _check_regular(u: np.ndarray, names: list[str], where: str) -> tuple[float, float, float]:
    """``(first grid position, step, max |residual|)`` of the least-squares grid of a gap-free run of sorted
    positions; CaseError when a slice lies more than :data:`GRID_REFUSE_FRAC` of the step off that grid."""
    steps = np.diff(u)
    first, step, res = fit_grid(u)
    off = np.abs(res)
    dev = float(off.max())
    if dev > max(GRID_REFUSE_FRAC * step, 0.01):
        k = int(off.argmax())
        raise CaseError(where, f"slice positions are not on a regular grid: steps {steps.min():.4g}-{steps.max():.4g} mm "
                               f"(least-squares step {step:.4g}), the slice at {u[k]:.2f} mm ({names[k]}) lies "
                               f"{dev:.3g} mm ({100 * dev / step:.0f}% of the step) off the grid",
                        "medldm never moves a slice: check the series is complete and unmodified, or resample it "
                        "to a regular grid with another tool (e.g. dcm2niix) and give medldm that NIfTI file")
    return first, step, dev


@dataclass
class Runs:
    """A stack split at gaps: ``runs`` (frames of each regular run, all images of its positions,
    ascending along the normal) and ``gaps`` (one dict per gap, see :func:`describe_gap`)."""

    runs: list[list[Frame]]
    gaps: list[dict] = field(default_factory=list)
    step: float | None = None


def regular_runs(frames: Sequence[Frame], *, where: str) -> Runs:
    """Split ONE stack (see :func:`split_stacks`) at gaps into runs of slices on a regular grid.

    Every image at one position goes to the same run (4D series stay whole). Raises
    :class:`CaseError` when a run is not regular (a slice off the grid without a clean gap) or when
    the stack breaks into more than :data:`MAX_PARTS` runs. Without patient geometry: one run.
    """
    frames = list(frames)
    d = _positions(frames)
    if d is None or len(frames) < 2:
        return Runs([frames])
    _, groups = _position_groups(d, _position_tol(frames))
    if len(groups) < 2:
        return Runs([frames])
    u = np.array([float(np.mean(d[g])) for g in groups])
    names = [_name(frames[g[0]].source) for g in groups]
    base = regular_step(u)
    gaps = _gap_lines(u, names, base)
    cuts = [0] + [k + 1 for k, s in enumerate(np.diff(u)) if s > GAP_FACTOR * base] + [len(u)]
    if len(cuts) - 1 > MAX_PARTS:
        raise CaseError(where, f"slice positions break into {len(cuts) - 1} runs at {len(gaps)} gaps (regular step "
                               f"{base:.4g} mm; first: {describe_gap(gaps[0])})",
                        "this is not one volume with a few missing slices; check the series is complete, or "
                        "resample it to a regular grid with another tool (e.g. dcm2niix)")
    runs = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if b - a >= 2:
            _check_regular(u[a:b], names[a:b], where)
        runs.append([frames[i] for g in groups[a:b] for i in g])
    return Runs(runs, gaps, base)


def _spacing_report(d: np.ndarray, warns: list[str], integ: dict, where: str, names: list[str]) -> tuple[float, float]:
    """Check steps along the normal; returns ``(first grid position, step)`` (mm) of the least-squares grid the
    affine describes. A gap or a slice off that grid raises :class:`CaseError` (never stacked at a wrong position)."""
    steps = np.diff(d)
    base = regular_step(d)
    gaps = _gap_lines(d, names, base)
    if gaps:
        raise CaseError(where, f"missing slices: {describe_gap(gaps[0])}"
                               + (f" (and {len(gaps) - 1} more gap{'s' * (len(gaps) > 2)})" if len(gaps) > 1 else "")
                               + ": the images do not form one regular volume",
                        "medldm never stacks across a gap; give the folder to scan_folder() / `medldm info`, "
                        "which splits the series into regular parts (..._part-1, ...)")
    first, step, dev = _check_regular(d, names, where)
    integ["slice_spacing_mm"] = step
    integ["max_grid_deviation_mm"] = dev
    integ["gaps"] = []
    integ["uniform_spacing"] = dev <= max(SPACING_REL_TOL * step, 0.01)
    if not integ["uniform_spacing"]:
        warns.append(f"non-uniform slice spacing: steps {steps.min():.4g}-{steps.max():.4g} mm (least-squares step "
                     f"{step:.4g}); max deviation from that regular grid {dev:.3g} mm")
    return first, step


def stack(frames: Sequence[Frame], *, where: str, volume: int | None = None) -> Stacked:
    """Build a volume from frames of ONE stack (same size and orientation, see :func:`split_stacks`).

    Returns data ``(X, Y, Z)`` with X = columns, Y = rows, Z = slices ascending along the normal.
    """
    warns: list[str] = []
    integ: dict = {}
    frames = _drop_duplicate_uids(list(frames), warns)
    g0 = frames[0].geom
    have_geom = all(f.geom.position is not None and f.geom.row_cos is not None for f in frames)
    n = g0.normal if have_geom else None
    if len(frames) > 1 and have_geom:
        o = np.stack([_orient(f) for f in frames])
        odev = float(np.max(np.abs(o - o[0])))
        integ["orientation_max_deviation"] = odev
        if odev > ORIENT_WARN_TOL:
            warns.append(f"inconsistent orientation across slices (direction cosines differ by up to "
                         f"{odev:.2g}): the first slice's orientation is used")
        d = np.array([float(f.geom.position @ n) for f in frames])
        frames, d = _select_volume(frames, d, _position_tol(frames), volume, where, warns)
    elif len(frames) > 1:
        warns.append("no ImagePositionPatient/ImageOrientationPatient: slices ordered by InstanceNumber "
                     "and assumed contiguous")
        frames = sorted(frames, key=lambda f: f.tiebreak)
        d = None
    else:
        d = None
        if volume not in (None, 0):
            warns.append(f"volume {volume} requested but the image holds one volume: ignored")

    for f in frames:  # header warnings of every slice, each text once
        warns.extend(w for w in f.geom.warnings if w not in warns)
    g0 = frames[0].geom  # first slice after sorting: the affine's origin
    row = g0.row_cos if g0.row_cos is not None else np.array([1.0, 0.0, 0.0])
    col = g0.col_cos if g0.col_cos is not None else np.array([0.0, 1.0, 0.0])
    normal = np.cross(row, col)
    origin = g0.position if g0.position is not None else np.zeros(3)
    origin_shift = np.zeros(3)
    if g0.row_cos is None or g0.position is None:
        warns.append("no patient geometry (ImagePositionPatient/ImageOrientationPatient): "
                     "affine is a scaled identity")

    if d is not None and len(frames) > 1:
        first, med = _spacing_report(d, warns, integ, where, [_name(f.source) for f in frames])
        p0, p1 = frames[0].geom.position, frames[-1].geom.position
        span = p1 - p0
        u = span / np.linalg.norm(span)
        tilt = float(np.degrees(np.arccos(np.clip(abs(u @ normal), 0.0, 1.0))))
        integ["tilt_deg"] = tilt
        step = u * (med / float(u @ normal))
        # the grid's first slice: the fitted position along the slice direction (the first slice's own position for
        # a regular series; within the residuals of it for positions rounded by the scanner)
        origin_shift = u * ((first - d[0]) / float(u @ normal))
        if tilt > TILT_WARN_DEG:
            warns.append(f"gantry tilt / sheared grid: slices are offset in-plane, {tilt:.2f} deg off the "
                         "normal; the affine is sheared (built from the actual positions)")
    else:
        th = g0.thickness
        if th is None:
            th = 1.0
            warns.append("single slice without SliceThickness: third spacing set to 1.0 mm")
        step = normal * th
    integ["n_slices"] = len(frames)

    # float32 (X=cols, Y=rows, Z), slice by slice; keep what exact_dtype needs
    rows, cols = frames[0].shape
    limit = max_voxels()
    if len(frames) * rows * cols > limit:
        raise CaseError(where, f"{len(frames)} slices of {cols}x{rows} pixels ({len(frames) * rows * cols:,} voxels) "
                               f"exceed medldm's limit of {limit:,} voxels (MEDLDM_MAX_VOXELS)",
                        "split the series into smaller ones (or crop it) with another tool first")
    data = np.empty((len(frames), rows, cols), dtype=np.float32)  # filled contiguously, transposed once
    dtypes, rescaled, lo, hi, integral = [], False, np.inf, -np.inf, True
    for k, f in enumerate(frames):
        v, dt, r = f.pixels()
        v = np.asarray(v)
        dtypes.append(dt)
        rescaled |= r
        if r and v.size:
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
            integral = integral and bool(np.issubdtype(v.dtype, np.integer) or np.all(np.mod(v, 1) == 0))
        data[k] = v
    data = np.ascontiguousarray(data.transpose(2, 1, 0))
    odt = exact_dtype_from_stats(lo, hi, integral, np.result_type(*dtypes), rescaled)
    aff = lps_to_ras(affine_lps(row, col, step, g0.spacing, origin + origin_shift))
    return Stacked(data, aff, odt, warns, integ, [f.source for f in frames])
