"""``medldm models [--json]``: the pretrained models shipped in the package, usable by name with ``-m NAME``."""

from __future__ import annotations

import json

from medldm.shipped import SHIPPED, card, folder_bytes, installed_models


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the model cards as JSON")


def _fmt_val(c: dict) -> str:
    """One line of validation figures from a card (training-pool validation scans of other subjects)."""
    v = c.get("validation") or {}
    ldm = v.get("refine") or v.get("ldm") or {}
    if c.get("task") == "synthesis" or "input_psnr" not in ldm:
        vae = v.get("vae") or {}
        return f"VAE reconstruction {vae['psnr']:.2f} dB / SSIM {vae['ssim']:.3f}" if "psnr" in vae else "n/a"
    return (f"{ldm['psnr']:.2f} dB / SSIM {ldm['ssim']:.3f} (degraded input {ldm['input_psnr']:.2f} dB / "
            f"{ldm['input_ssim']:.3f}); data_range 2 on the model range [-1, 1]")


def _fmt_heldout(name: str, c: dict) -> str | None:
    h = c.get("heldout")
    if not h:
        return None
    m = h["methods"]
    others = "; ".join(f"{k} {v['psnr']:.2f}" for k, v in m.items() if k != name)
    return (f"{m[name]['psnr']:.2f} dB / SSIM {m[name]['ssim']:.3f} on {', '.join(h['scans'])} "
            f"(`{h['command']}`; {others} dB)")


def _usage(name: str, m) -> str:
    """How to call a shipped model; synthesis models: their class names or the label map they take
    (from the folder's extra.json, read as JSON: no torch)."""
    if m.task != "synthesis":
        return f"medldm enhance -m {name} -i IN -o OUT"
    try:
        extra = json.loads((m.path / "extra.json").read_text())
    except (OSError, ValueError):
        extra = {}
    if extra.get("condition") == "mask":
        k = int(extra.get("mask_classes") or 0)
        return (f"medldm synthesize -m {name} --mask LABELS.nii.gz -n N -o OUT  (label map values 0..{k - 1}, "
                "0 = background; image/label pairs)")
    names = extra.get("class_names") or []
    if names:
        return (f"medldm synthesize -m {name} -n N -o OUT --condition class=NAME  (classes: {', '.join(names)}; "
                "or contrast=/position=)")
    return f"medldm synthesize -m {name} -n N -o OUT"


def run(args) -> int:
    have = installed_models()
    if args.json:
        print(json.dumps({n: {**card(n), "path": str(m.path), "installed": n in have} for n, m in SHIPPED.items()},
                         indent=2))
        return 0
    for name, m in SHIPPED.items():
        if name not in have:
            print(f"{name}  [{m.task}]  NOT INSTALLED — train it: medldm train {m.config} -o runs/{name}\n")
            continue
        c = card(name)
        size = folder_bytes(m.path) / 1e6
        lines = [f"{name}  [{m.task}]  {size:.1f} MB  {m.path}", f"  {m.description}"]
        if c:
            data = ", ".join(s.removeprefix("pkg://") for s in c.get("train", []))
            val = ", ".join(s.removeprefix("pkg://") for s in c.get("val", []))
            steps = ", ".join(f"{k} {v}" for k, v in c.get("steps", {}).items())
            lines += [f"  trained: {c.get('command', '')}  ({steps} steps, {c.get('wall_s', 0) / 60:.0f} min, "
                      f"{c.get('hardware', '?')})",
                      f"  training data: {data}",
                      f"  validation ({val}): {_fmt_val(c)}"]
            held = _fmt_heldout(name, c)
            if held:
                lines.append(f"  held-out scans: {held}")
        lines.append(f"  use: {_usage(name, m)}")
        print("\n".join(lines) + "\n")
    return 0
