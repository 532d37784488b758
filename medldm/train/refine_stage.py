"""Stage 3 (sr / denoise): a pixel-space refiner that gets past the VAE's reconstruction ceiling.

Latent diffusion can never return detail the VAE decoder cannot reconstruct, and a few-step sample is not the
minimum-error estimate that PSNR rewards. The refiner is a small MONAI ``BasicUNet`` at full resolution (by
default without normalization layers, so its output does not depend on the image size) that sees both the
decoded diffusion output ``d`` and the degraded input ``y``:

    x_hat = base + refiner([d, y]),   base = y (``refine.base: degraded``, default) or d (``decoded``)

Training pairs are made exactly as at inference: clean crops (augmented like stage 1), ``y`` degraded on the
fly like stage 2's condition, and ``d`` the decoded diffusion sample for ``y`` drawn with the frozen stage-2
U-Net and the model's default sampler and step count (no gradient). Training the refiner on decoded *clean*
latents instead (an earlier design) teaches it to trust ``d`` far more than a real sample deserves.
Validation reports PSNR/SSIM of the degraded input, the diffusion output and the refined output.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from medldm.config import to_mapping
from medldm.data.datasets import step_rng
from medldm.train.conditioning import make_pair, space_to_depth
from medldm.train.data import RunData, center_batch
from medldm.train.engine import Runtime, adamw, prepare
from medldm.train.ldm_stage import stage_sampler, val_sigma
from medldm.train.logging import save_grid

DATA_RANGE = 2.0
_NORMS = {"none": None, "instance": ("instance", {"affine": True}), "batch": ("batch", {"affine": True})}


def build_refiner(spatial_dims: int, features, norm: str = "instance") -> nn.Module:
    """MONAI BasicUNet: (N, 2, *S) [decoded, degraded] -> (N, 1, *S) residual."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=spatial_dims, in_channels=2, out_channels=1, features=tuple(features),
                     norm=_NORMS[norm])


def apply_refiner(refiner: nn.Module, decoded: torch.Tensor, degraded: torch.Tensor,
                  base: str = "decoded") -> torch.Tensor:
    """decoded, degraded (N, 1, *S) in the model range -> refined (N, 1, *S) = base + refiner([d, y])."""
    degraded = degraded.to(decoded.dtype)
    res = refiner(torch.cat([decoded, degraded], dim=1)).to(decoded.dtype)
    return (degraded if base == "degraded" else decoded) + res


def refiner_spec(model_dir: str | Path) -> dict | None:
    """``extra.json["refiner"]`` of a model folder with ``refiner.safetensors``, or None."""
    import json

    model_dir = Path(model_dir)
    extra_file, weights = model_dir / "extra.json", model_dir / "refiner.safetensors"
    if not (extra_file.is_file() and weights.is_file()):
        return None
    return json.loads(extra_file.read_text()).get("refiner") or None


def load_refiner(model_dir: str | Path) -> nn.Module | None:
    """The refiner of a model folder (``refiner.safetensors`` + ``extra.json["refiner"]``), or None. Its
    residual base is ``refiner_spec(model_dir)["base"]`` (folders written before that key: ``decoded``)."""
    from safetensors.torch import load_file

    from medldm.io.errors import CaseError
    from medldm.models.folder import read_safetensors_header

    file = Path(model_dir) / "refiner.safetensors"
    try:  # a damaged or hostile folder: one line naming the file, nothing large allocated first
        spec = refiner_spec(model_dir)
        if spec is None:
            return None
        dims, features = spec["spatial_dims"], list(spec["features"])
        if dims not in (2, 3) or len(features) != 6 or not all(type(f) is int and 1 <= f <= 1024 for f in features):
            raise ValueError(f"extra.json refiner spec spatial_dims={dims!r}, features={features!r} is out of range")
        read_safetensors_header(file)
        net = build_refiner(dims, features, spec.get("norm", "instance"))
        net.load_state_dict(load_file(str(file)))
    except Exception as exc:
        raise CaseError(file, f"not a usable refiner ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                        "the model folder is damaged: copy it again") from exc
    return net.eval().requires_grad_(False)


class RefineStage:
    name = "refine"

    def __init__(self, cfg, data: RunData, rt: Runtime, ldm_dir: Path, out_dir: Path):
        from medldm.data.augment import Augmenter
        from medldm.diffusion import make_schedule
        from medldm.models import EMA, load_model

        self.cfg, self.data, self.rt, self.tcfg = cfg, data, rt, cfg.refine
        self.ldm_dir = Path(ldm_dir)
        bundle = load_model(ldm_dir)
        self.bundle = bundle
        self.vae = bundle.vae.to(rt.device).eval().requires_grad_(False)
        self.denoiser = bundle.denoiser.to(rt.device).eval().requires_grad_(False)
        self.scale = bundle.scale_factor
        self.f = cfg.factor
        self.schedule = make_schedule(cfg.diffusion)
        self.augment = Augmenter(cfg.augment, cfg.spatial_dims) if self.tcfg.augment else None
        torch.manual_seed(cfg.seed)
        self.refiner = build_refiner(cfg.spatial_dims, self.tcfg.features, self.tcfg.norm)
        self.modules = {"refiner": self.refiner}
        self.wrapped = {"refiner": prepare(self.refiner, rt)}
        self.optimizers = {"refiner": adamw(self.refiner.parameters(), self.tcfg.lr, self.tcfg.weight_decay, rt)}
        self.ema = {"refiner": EMA(self.refiner, self.tcfg.ema_decay)} if self.tcfg.ema_decay > 0 else {}
        self.config = to_mapping(cfg)
        self.metrics: dict[str, float] = {}

    def cpu_batch(self, step: int, micro: int) -> dict:
        rng = step_rng(self.cfg.seed, step, micro, self.rt.dist.rank, 3)
        store = self.data.train
        idx, corners = store.draw(rng, self.cfg.data.batch_size)
        clean = store.crop(idx, corners)
        if self.augment is not None:
            clean = self.augment(clean, rng)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        degraded, level = make_pair(clean, self.cfg.task, self.cfg.degrade, gen)
        return {"clean": clean, "degraded": degraded, "level": level, "seed": int(rng.integers(0, 2**62))}

    def to_device(self, b: dict) -> dict:
        out = {k: self.rt.to(b[k]) for k in ("clean", "degraded")}
        return {**out, "level": b["level"].to(self.rt.device), "seed": b["seed"]}

    @staticmethod
    def batch_size(b: dict) -> int:
        return b["clean"].shape[0]

    @torch.no_grad()
    def diffuse(self, degraded: torch.Tensor, level: torch.Tensor, seed: int) -> torch.Tensor:
        """The decoded diffusion sample for ``degraded`` (N, 1, *patch): the stage-2 model run as inference runs
        it (default sampler and step count of the model folder)."""
        from medldm.diffusion import make_model_fn, sample, start_noise

        d = self.cfg.diffusion
        cond = self.rt.to(space_to_depth(degraded, self.f))
        lev = level.to(self.rt.device) if self.cfg.unet.noise_level_cond else None
        fn = make_model_fn(self.denoiser, self.schedule, cond=cond, noise_level=lev)
        gen = torch.Generator().manual_seed(int(seed))
        shape = (len(degraded), self.cfg.vae.latent_channels, *(s // self.f for s in degraded.shape[2:]))
        x_t = start_noise(shape, self.schedule, generator=gen).to(self.rt.device)
        with self.rt.autocast():
            z = sample(stage_sampler(d), lambda a, t: fn(a, t).float(), x_t, self.schedule, d.sampling_steps,
                       generator=gen)
            return self.vae.decode(z / self.scale).float()

    def losses(self, b: dict, step: int) -> dict[str, torch.Tensor]:
        decoded = self.diffuse(b["degraded"], b["level"], b["seed"])
        out = apply_refiner(self.wrapped["refiner"], decoded, b["degraded"], self.tcfg.base).float()
        loss = (out - b["clean"].float()).abs().mean()
        return {"loss": loss, "decoded_l1": (decoded - b["clean"].float()).abs().mean().detach()}

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _enhance(self, x: torch.Tensor):
        """(degraded, diffusion output, refined) for validation crops x (N, 1, *patch)."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        degraded, level = make_pair(x, self.cfg.task, self.cfg.degrade, gen, val_sigma(self.cfg))
        dec = self.diffuse(degraded, level, self.cfg.seed + 1)
        with self.rt.autocast():
            ref = apply_refiner(self._eval_net(), dec, self.rt.to(degraded), self.tcfg.base).float()
        return degraded, dec.cpu(), ref.cpu()

    def _eval_net(self) -> nn.Module:
        net = copy.deepcopy(self.refiner)
        if self.ema:
            self.ema["refiner"].copy_to(net)
        return net.eval()

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        from medldm.metrics import psnr, ssim

        store, prefix = self.data.val_or_train()
        x, _, _ = center_batch(store, self.tcfg.val_max_items)
        degraded, dec, ref = self._enhance(x)
        m = {}
        for name, img in (("", ref), ("ldm_", dec), ("input_", degraded)):
            m[f"{prefix}{name}psnr"] = float(psnr(img, x, data_range=DATA_RANGE).mean())
            m[f"{prefix}{name}ssim"] = float(ssim(img, x, data_range=DATA_RANGE).mean())
        self.metrics = m
        return m

    def images(self, step: int, path: Path) -> None:
        store, _ = self.data.val_or_train()
        x, _, _ = center_batch(store, 8)
        degraded, dec, ref = self._enhance(x)
        save_grid([x, degraded, dec, ref], path)

    def extra(self) -> dict:
        ex = dict(self.bundle.extra)
        ex["refiner"] = {"spatial_dims": self.cfg.spatial_dims, "features": list(self.tcfg.features),
                         "norm": self.tcfg.norm, "base": self.tcfg.base,
                         "inputs": ["decoded", "degraded"], "residual": True,
                         "apply": "medldm.train.refine_stage.apply_refiner"}
        ex["refine_val_metrics"] = self.metrics
        return ex

    def export(self, path: Path) -> None:
        from medldm.models import save_model_folder

        modules = {"vae": self.vae, "denoiser": self._raw_denoiser(), "refiner": self._eval_net()}
        ema_file = self.ldm_dir / "denoiser_ema.safetensors"
        if ema_file.is_file():
            modules["denoiser_ema"] = self.denoiser
        save_model_folder(path, config=self.config, modules=modules, extra=self.extra())

    def _raw_denoiser(self) -> nn.Module:
        from medldm.models import load_model

        return load_model(self.ldm_dir, ema=False).denoiser
