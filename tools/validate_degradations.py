"""Validation figures for docs/degradations.md (CPU): low-dose CT noise against a direct Poisson
simulation, low-dose run time on a 512² slice, and Gaussian/Rician sigma on MNI152.

    python tools/validate_degradations.py [THREADS]
"""

import sys
import time

import numpy as np
import torch

from medldm.data import lowdose as ld
from medldm.data import radon as rd
from medldm.data.degrade import apply_degradation, intensity_range
from medldm.io import load_scan
from medldm.samples import sample_path


def reconstruct(counts: np.ndarray, incident: float, p: torch.Tensor, n: int, px: float) -> np.ndarray:
    """FBP of the noise in the log-transformed counts, in HU."""
    logs = -torch.log(torch.from_numpy(np.maximum(counts, 1)).double() / incident) - p
    return (rd.fbp(logs, n) / px * 1000 / ld.MU_WATER).numpy()


def lowdose_vs_direct_poisson(repeats: int = 8) -> None:
    ct = load_scan(sample_path("ct-small"))
    hu = ct.as_tensor()[None, ..., 0].double()
    px = float(ct.meta["spacing"][0])
    body = ((hu[0] > -200) & (hu[0] < 200)).numpy()
    n = hu.shape[-1]
    nv = rd.default_views(n)
    p = rd.radon(ld._to_mu(hu, ld.MU_WATER), nv) * px
    lam = np.repeat((1e5 * torch.exp(-p)).numpy(), repeats, 0)
    rng = np.random.default_rng(0)
    full = reconstruct(rng.poisson(lam), 1e5, p, n, px)[:, body]
    print(f"CT_small {n}², {nv} views, I0=1e5: direct Poisson full-dose noise {full.std():.2f} HU (in |HU|<200)")
    for d in (0.5, 0.25, 0.1):
        low = reconstruct(rng.poisson(d * lam), d * 1e5, p, n, px)[:, body]
        direct = np.sqrt(low.var() - full.var())
        sim = ld.lowdose_noise(hu.expand(repeats, -1, -1), px, d, np.random.default_rng(1)).numpy()[:, body].std()
        pred = np.sqrt(np.mean(ld.lowdose_noise_std(hu, px, d)[0].numpy()[body] ** 2))
        print(f"  dose {d}: extra noise direct {direct:.2f}  simulated {sim:.2f}  predicted {pred:.2f} HU;"
              f"  simulated/sqrt(1/d-1) {sim / np.sqrt(1 / d - 1):.2f}; low-dose total direct {low.std():.2f}")


def lowdose_runtime() -> None:
    big = load_scan(sample_path("ct-head"))
    h = big.as_tensor()[None, ..., 0]
    px = float(big.meta["spacing"][0])
    brain = ((h[0] > 15) & (h[0] < 50)).numpy()
    for coarse in (1, 2):
        t = time.perf_counter()
        nz = ld.lowdose_noise(h, px, 0.25, np.random.default_rng(0), coarse=coarse)
        print(f"693_UNCI 512², {rd.default_views(512)} views, coarse={coarse}: {time.perf_counter() - t:.1f} s/slice "
              f"on {torch.get_num_threads()} CPU thread(s); quarter-dose extra noise in brain "
              f"{nz[0].numpy()[brain].std():.1f} HU")
    pf = ld.lowdose_noise_std(h, px, 0.5)[0].numpy()[brain]
    print(f"  implied full-dose noise in brain {np.sqrt(np.mean(pf ** 2)):.1f} HU")


def noise_levels() -> None:
    mni = load_scan(sample_path("mr-mni152"))
    x = mni.numpy().astype(np.float64)
    for kind in ("gaussian", "rician"):
        for lev in (0.02, 0.05):
            y = apply_degradation(mni, kind, lev, seed=0).numpy().astype(np.float64)
            s = lev * intensity_range(x)
            bg, br = x == 0, x > 10 * s
            est = np.std(y - x) if kind == "gaussian" else np.sqrt(np.mean(y[bg] ** 2) / 2)
            extra = f", bright-region std {np.std(y[br] - x[br]):.3f}" if kind == "rician" else ""
            print(f"MNI152 {kind} {lev}: sigma {s:.3f}, measured {est:.3f} ({est / s - 1:+.2%}){extra}")


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    lowdose_vs_direct_poisson()
    lowdose_runtime()
    noise_levels()
