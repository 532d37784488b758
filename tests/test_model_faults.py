"""Hostile and damaged model folders, synthesize's size / spacing / OUT checks, warnings on the terminal
(issue 10, items 6, 9, 11, 12, 14). Every fault is a one-line usage error (exit 2) naming the file at fault and
what to do, found before anything large is allocated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from medldm.cli import main
from medldm.io.errors import CaseError
from medldm.shipped import resolve_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(resolve_model(name), dst)
    return dst


def _edit(folder: Path, fn) -> Path:
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    fn(cfg)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


def _usage_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one stderr line; return it."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def no_networks(monkeypatch):
    """Fail the test if the networks are built for real (meta-device builds are fine: they allocate nothing)."""
    from medldm.models import folder

    def guarded(*args, **kwargs):  # pragma: no cover - only reached on a regression
        raise AssertionError("a network was built for real, or tensors were read")

    for name in ("_load_into", "load"):
        monkeypatch.setattr(folder, name, guarded)
    import medldm.models.denoiser as denoiser
    import medldm.models.vae as vae

    real_vae, real_den = vae.build_vae, denoiser.build_denoiser

    def only_on_meta(real):
        def build(*args, **kwargs):
            import torch

            if torch.empty(0).device.type != "meta":
                raise AssertionError("a network was built outside the meta device")
            return real(*args, **kwargs)
        return build

    monkeypatch.setattr(vae, "build_vae", only_on_meta(real_vae))
    monkeypatch.setattr(denoiser, "build_denoiser", only_on_meta(real_den))


# ------------------------------------------------------------------ damaged model folders -> exit 2, one line

def test_config_yaml_that_is_a_list(tmp_path, capsys, no_networks):
    m = _copy(tmp_path, "mr-synth-2d")
    (m / "config.yaml").write_text("- vae\n- unet\n")
    err = _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", str(tmp_path / "o")])
    assert f"{m / 'config.yaml'}: holds a YAML list, not a mapping" in err and "copy it again" in err
    assert not (tmp_path / "o").exists()


def test_negative_channels(tmp_path, capsys, no_networks):
    m = _edit(_copy(tmp_path, "mr-synth-2d"), lambda c: c["vae"].__setitem__("channels", [-16, 32, 32]))
    err = _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", str(tmp_path / "o")])
    assert "config.yaml: invalid model config: vae.channels[0] = -16: must be an integer in 1..4096" in err


@pytest.mark.parametrize("key, value, expect", [
    ("num_res_blocks", "2", "unet.num_res_blocks: expected int, got '2'"),
    ("num_head_channels", 0, "unet.num_head_channels = 0"),
    ("attention_levels", [False, True], "unet.attention_levels"),
    ("noise_level_cond", "yes", "unet.noise_level_cond: expected bool, got 'yes'"),
    ("num_classes", -3, "unet.num_classes = -3"),
])
def test_bad_unet_values(tmp_path, capsys, no_networks, key, value, expect):
    m = _edit(_copy(tmp_path, "mr-synth-2d"), lambda c: c["unet"].__setitem__(key, value))
    assert expect in _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", str(tmp_path / "o")])


def test_section_that_is_not_a_mapping_and_bad_extra(tmp_path, capsys, no_networks):
    m = _edit(_copy(tmp_path, "mr-synth-2d"), lambda c: c.__setitem__("unet", [32, 64]))
    assert "section 'unet' is a list" in _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", "o"])
    m = _copy(tmp_path / "b", "mr-synth-2d")
    (m / "extra.json").write_text("[1, 2]")
    assert f"{m / 'extra.json'}: holds a JSON list" in _usage_error(
        capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", "o"])
    ex = json.loads((resolve_model("mr-synth-2d") / "extra.json").read_text())
    (m / "extra.json").write_text(json.dumps({**ex, "resize_to": [100000, -1]}))
    assert "resize_to = [100000, -1]" in _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", "o"])


@pytest.mark.parametrize("file, key, near", [("config.yaml", "frobnicate", None), ("config.yaml", "tsak", "task"),
                                           ("extra.json", "scale_facter", "scale_factor")])
def test_unknown_top_level_keys_are_usage_errors(tmp_path, capsys, no_networks, file, key, near):
    """Issue 20.14: an unknown top-level key in config.yaml / extra.json (before: accepted silently) is a usage
    error naming the file, the key and the nearest valid key, for enhance and synthesize alike."""
    for name, argv in (("mr-synth-2d", ["synthesize", "-n", "1", "-o", str(tmp_path / "o")]),
                       ("mr-denoise-2d", ["enhance", "-i", str(tmp_path / "none.nii.gz"), "-o", str(tmp_path / "e")])):
        m = _copy(tmp_path / name, name)
        if file == "config.yaml":
            _edit(m, lambda c: c.__setitem__(key, 3))
        else:
            ex = json.loads((m / "extra.json").read_text())
            (m / "extra.json").write_text(json.dumps({**ex, key: 1.0}))
        (tmp_path / "none.nii.gz").write_bytes(b"")
        err = _usage_error(capsys, [argv[0], "-m", str(m), *argv[1:]])
        assert f"{m / file}: unknown key {key!r}" in err
        assert (f"did you mean {near!r}" in err) if near else "did you mean" not in err


def test_known_keys_are_the_training_config_sections():
    """The model folder's list of config.yaml keys is the training config's sections (models/ cannot import train/)."""
    import dataclasses

    from medldm.models.folder import CONFIG_KEYS, EXTRA_KEYS
    from medldm.train.schema import TrainingConfig

    assert CONFIG_KEYS == {f.name for f in dataclasses.fields(TrainingConfig)}  # model: is migrated before the check
    for name in ("mr-denoise-2d", "mr-sr2x-2d", "mr-thinslice-4x", "mr-synth-2d", "mr-synth-mask-2d"):
        assert set(json.loads((resolve_model(name) / "extra.json").read_text())) <= EXTRA_KEYS


def test_diffusion_section_bounds(tmp_path, capsys, no_networks):
    m = _edit(_copy(tmp_path, "mr-synth-2d"), lambda c: c["diffusion"].__setitem__("num_train_timesteps", 10**12))
    assert "diffusion.num_train_timesteps" in _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", "o"])


def test_yaml_alias_bomb(tmp_path, capsys, no_networks):
    m = _copy(tmp_path, "mr-synth-2d")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    (m / "config.yaml").write_text("\n".join(lines) + "\n" + (m / "config.yaml").read_text())
    assert "more than 200,000 entries" in _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", "o"])


def test_config_claiming_more_parameters_than_the_weights_hold(tmp_path, capsys, no_networks):
    """Wider U-Net in config.yaml than in denoiser_ema.safetensors: refused from the header, before loading."""
    m = _edit(_copy(tmp_path, "mr-synth-2d"), lambda c: c["unet"].__setitem__("channels", [64, 128, 128]))
    err = _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", str(tmp_path / "o")])
    assert "denoiser_ema.safetensors does not match config.yaml (config.yaml describes" in err
    claimed, held = (int(x.split()[0].strip(";").replace(",", "")) for x in
                     (err.split("describes ")[1], err.split("denoiser_ema.safetensors holds ")[1]))
    assert claimed > 3 * held


def test_truncated_and_garbage_weights(tmp_path, capsys, no_networks):
    m = _copy(tmp_path, "mr-synth-2d")
    data = (m / "vae.safetensors").read_bytes()
    (m / "vae.safetensors").write_bytes(data[: len(data) // 2])
    err = _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", "o"])
    assert "vae.safetensors: vae.safetensors is not a readable safetensors file" in err and "truncated" in err
    (m / "vae.safetensors").write_bytes(b"\x80\x04\x95pickle: never unpickled" * 10)
    assert "not a readable safetensors file" in _usage_error(capsys, ["synthesize", "-m", str(m), "-n", "1", "-o", "o"])


def test_read_safetensors_header_matches_safetensors(tmp_path):
    from safetensors import safe_open

    from medldm.models.folder import read_safetensors_header

    f = resolve_model("mr-denoise-2d") / "refiner.safetensors"
    head = read_safetensors_header(f)
    with safe_open(str(f), framework="pt") as st:
        assert set(head) == set(st.keys())
        assert all(tuple(st.get_slice(k).get_shape()) == head[k][1] for k in head)
    bad = tmp_path / "x.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="does not fit"):
        read_safetensors_header(bad)


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from medldm.models import load_model
    from medldm.io.errors import CaseError
    for folder in sys.argv[1:]:
        try:
            load_model(folder)
            print("LOADED", folder)
        except CaseError as e:
            print("REFUSED", e.line())
    print("MAXRSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def test_hostile_sizes_are_refused_without_allocating(tmp_path):
    """channels [16000] (9.4 GB before the fix) and a deep 4096-wide config (30 G parameters): refused, and the
    process never grows past what importing torch and MONAI takes."""
    wide = _edit(_copy(tmp_path / "a", "mr-synth-2d"), lambda c: c["vae"].__setitem__("channels", [16000, 32, 32]))

    def deep(c):
        c["vae"].update(channels=[4096, 4096, 4096], num_res_blocks=16)

    huge = _edit(_copy(tmp_path / "b", "mr-synth-2d"), deep)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MEDLDM_MAX_PARAMS", None)
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(wide), str(huge)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "LOADED" not in out
    assert "vae.channels[0] = 16000: must be an integer in 1..4096" in out
    assert "parameters, more than the 500,000,000 allowed" in out and "MEDLDM_MAX_PARAMS" in out
    rss = int(out.split("MAXRSS_MB")[1])
    assert rss < 1500, f"{rss} MB: something was allocated"


def test_max_params_env(tmp_path, monkeypatch):
    from medldm.models import load_model

    m = _copy(tmp_path, "mr-synth-2d")
    monkeypatch.setenv("MEDLDM_MAX_PARAMS", "1000")
    with pytest.raises(CaseError, match="more than the 1,000 allowed"):
        load_model(m)
    monkeypatch.setenv("MEDLDM_MAX_PARAMS", "lots")
    with pytest.raises(CaseError, match="MEDLDM_MAX_PARAMS='lots'"):
        load_model(m)
    monkeypatch.setenv("MEDLDM_MAX_PARAMS", "2e9")
    assert load_model(m).denoiser is not None


# ------------------------------------------------------------------ refiner

@pytest.fixture(scope="module")
def mr_scan(dipy_files) -> Path:
    return dipy_files / "aniso_vox.nii.gz"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-shapes", "hostile-spec"])
def test_bad_refiner_is_a_usage_error(tmp_path, capsys, mr_scan, damage):
    m = _copy(tmp_path, "mr-denoise-2d")
    ref = m / "refiner.safetensors"
    if damage == "truncated":
        ref.write_bytes(ref.read_bytes()[:1000])
    elif damage == "garbage":
        ref.write_bytes(b"\x80\x04pickle-not-allowed")
    elif damage == "wrong-shapes":
        shutil.copy(m / "vae.safetensors", ref)
    else:
        ex = json.loads((m / "extra.json").read_text())
        ex["refiner"]["features"] = [100000] * 6
        (m / "extra.json").write_text(json.dumps(ex))
    out = tmp_path / "o.nii.gz"
    err = _usage_error(capsys, ["enhance", "-m", str(m), "-i", str(mr_scan), "-o", str(out), "--device", "cpu"])
    assert f"{ref}: not a usable refiner" in err and "copy it again" in err
    assert not out.exists()


def test_load_refiner_raises_case_error(tmp_path):
    from medldm.models import load_model, load_refiner

    m = _copy(tmp_path, "mr-denoise-2d")
    assert load_refiner(m) is not None
    (m / "refiner.safetensors").write_bytes(b"junk")
    with pytest.raises(CaseError, match="refiner.safetensors: not a usable refiner"):
        load_refiner(m)
    with pytest.raises(CaseError, match="refiner.safetensors: not a usable refiner"):
        load_model(m)


def test_refiner_goes_through_the_shape_checked_loader(tmp_path, no_networks):
    """A refiner whose weights do not match extra.json, or too large for MEDLDM_MAX_PARAMS, is refused from the
    safetensors header and a meta-device build (no_networks: nothing built for real, no tensor read)."""
    from medldm.models import load_model

    m = _copy(tmp_path, "mr-denoise-2d")
    ex = json.loads((m / "extra.json").read_text())
    ex["refiner"]["features"] = [16, 16, 32, 64, 128, 16]
    (m / "extra.json").write_text(json.dumps(ex))
    with pytest.raises(CaseError, match=r"refiner\.safetensors: not a usable refiner \(refiner\.safetensors does not "
                       r"match extra\.json .* reshaped tensors"):
        load_model(m)


# ------------------------------------------------------------------ synthesize options and sizes

@pytest.fixture
def no_generate(monkeypatch):
    from medldm.pipelines import synthesize

    monkeypatch.setattr(synthesize.Synthesizer, "generate",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("generate called")))


@pytest.mark.parametrize("opts, expect", [
    (["--spacing", "-1"], "--spacing -1: must be a positive voxel size in mm"),
    (["--spacing", "0"], "--spacing 0: must be a positive"),
    (["--spacing", "nan"], "--spacing nan"),
    (["--size", "0,0"], "--size 0,0: every value must be >= 1"),
    (["--size", "64,64,64"], "--size 64,64,64: needs 2 positive values, each a multiple of 4, e.g. 128,128"),
    (["--size", "66,64"], "multiple of 4"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_synthesize_option_values_are_usage_errors(tmp_path, capsys, no_generate, opts, expect):
    out = tmp_path / "o"
    err = _usage_error(capsys, ["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o", str(out), *opts])
    assert expect in err
    assert not out.exists()


def test_synthesize_size_bounded_by_memory(tmp_path, capsys, monkeypatch, no_generate):
    """`--size 4096,4096` tried to allocate 34 GB (one self-attention map): now refused from an estimate."""
    from medldm.pipelines import synthesize

    monkeypatch.delenv("MEDLDM_MAX_MEMORY", raising=False)
    monkeypatch.setattr(synthesize, "_available_ram", lambda: 16 << 30)
    err = _usage_error(capsys, ["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o", str(tmp_path / "o"),
                                "--size", "4096,4096"])
    assert "--size 4096,4096: synthesis would need about" in err and "80% of the available memory" in err
    assert "MEDLDM_MAX_MEMORY" in err and "pass a smaller size (2048,2048 fits)" in err
    monkeypatch.setenv("MEDLDM_MAX_MEMORY", "100M")
    err = _usage_error(capsys, ["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o", str(tmp_path / "o"),
                                "--size", "1024,1024"])
    assert "more than the 100 MB allowed (MEDLDM_MAX_MEMORY)" in err
    monkeypatch.setenv("MEDLDM_MAX_MEMORY", "a lot")
    assert "MEDLDM_MAX_MEMORY='a lot'" in _usage_error(capsys, ["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o",
                                                                str(tmp_path / "o")])
    monkeypatch.delenv("MEDLDM_MAX_MEMORY")
    monkeypatch.setenv("MEDLDM_MAX_VOXELS", "1000")
    assert "more than the 1,000 allowed" in _usage_error(capsys, ["synthesize", "-m", "mr-synth-2d", "-n", "1",
                                                                  "-o", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from medldm.models import load_model
    from medldm.pipelines.synthesize import Synthesizer
    from medldm.shipped import resolve_model
    syn = Synthesizer(load_model(resolve_model("mr-synth-2d")))
    size = (int(sys.argv[1]),) * 2
    def status(key):  # kB figures of /proc/self/status
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS (Linux >= 4.0)
    before = status("VmRSS")
    syn.generate(size=size, steps=1)
    print(status("VmHWM") - before, syn.estimate_bytes(size))
""")


def test_memory_estimate_is_not_below_the_measured_peak():
    """The estimate must not let through what does not fit: above the measured growth of the process at
    512x512 (shipped synthesis model), and above the 34 GB attention map of the report at 4096x4096."""
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, "512"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    measured, estimate = map(int, r.stdout.split())
    assert measured < estimate < 4 * measured + (64 << 20), (measured, estimate)
    from medldm.models import load_model
    from medldm.pipelines.synthesize import Synthesizer

    syn = Synthesizer(load_model(resolve_model("mr-synth-2d")))
    assert syn.estimate_bytes((4096, 4096)) > 34 << 30
    assert syn.estimate_bytes((64, 64)) < 100 << 20


# ------------------------------------------------------------------ synthesize never replaces what it did not write

def test_synthesize_into_current_folder_keeps_foreign_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synth_00000.nii.gz").write_text("my own file")
    capsys.readouterr()
    assert main(["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o", ".", "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "FAILED synth_00000.nii.gz: exists and was not written by medldm synthesize" in err
    assert (tmp_path / "synth_00000.nii.gz").read_text() == "my own file"
    assert not (tmp_path / "synth_00000.json").exists()
    (tmp_path / "synth_00000.nii.gz").unlink()
    (tmp_path / "synth_00000.json").write_text('{"notes": "mine"}')
    assert main(["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o", ".", "--steps", "1", "--quiet"]) == 1
    assert "synth_00000.json: exists and is not a medldm synthesize record" in capsys.readouterr().err
    assert (tmp_path / "synth_00000.json").read_text() == '{"notes": "mine"}'
    (tmp_path / "synth_00000.json").unlink()
    (tmp_path / "medldm-synthesize-report.json").write_text("thesis notes")
    assert "was not written by medldm synthesize" in _usage_error(
        capsys, ["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o", ".", "--steps", "1", "--quiet"])
    assert (tmp_path / "medldm-synthesize-report.json").read_text() == "thesis notes"


def test_synthesize_resume_is_keyed_on_settings(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o", str(out), "--steps", "1", "--quiet"]
    assert main(argv) == 0
    first = (out / "synth_00000.nii.gz").read_bytes()
    assert main(argv) == 0  # same settings: skipped
    capsys.readouterr()
    assert main([*argv[:-2], "2", "--quiet"]) == 1
    assert "an earlier run made this scan with other settings (steps)" in capsys.readouterr().err
    assert main([*argv, "--seed", "5"]) == 1
    assert "other settings (seed)" in capsys.readouterr().err
    assert (out / "synth_00000.nii.gz").read_bytes() == first


# ------------------------------------------------------------------ warnings on the terminal

_WARN_SCRIPT = textwrap.dedent("""
    import sys, warnings
    import numpy as np
    import medldm.cli.models as models
    from medldm.cli import main

    def run(args):
        np.divide(np.zeros(3), np.zeros(3))  # a real numpy RuntimeWarning
        np.divide(np.zeros(3), np.zeros(3))
        for _ in range(3):  # a multi-line warning raised inside a library, three times
            warnings.warn_explicit("pixdim[0] (qfac) should be 1 (default) or -1\\nsetting qfac to 1", UserWarning,
                                   "/x/site-packages/nibabel/nifti1.py", 10)
        warnings.warn_explicit("old API", DeprecationWarning, "/x/site-packages/monai/a.py", 1)
        warnings.warn_explicit("The given NumPy array is not writable, and PyTorch does not support it",
                               UserWarning, "/x/site-packages/torch/b.py", 1)
        return 0

    models.run = run
    sys.exit(main(sys.argv[1:]))
""")


def test_library_warnings_become_one_line_each():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-c", _WARN_SCRIPT, "models"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines.count("WARNING: pixdim[0] (qfac) should be 1 (default) or -1 setting qfac to 1 [nibabel]") == 1
    assert sum("invalid value encountered in divide" in x for x in lines) == 1
    assert all(x.startswith("WARNING: ") for x in lines), lines
    assert "Warning:" not in r.stderr and "old API" not in r.stderr and "not writable" not in r.stderr
    # --verbose and -W keep Python's own display
    for extra, argv in ((["-W", "always"], ["models"]), ([], ["--verbose", "models"])):
        r = subprocess.run([sys.executable, *extra, "-c", _WARN_SCRIPT, *argv], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0 and "UserWarning: pixdim[0]" in r.stderr, r.stderr


def test_case_warnings_name_the_input_file(tmp_path, capsys, mr_scan):
    """`--volume` on a 3D image: the loader's warning, printed as `WARNING <input file>: <text>`."""
    from medldm.cli.warn import print_case_warnings, route_warnings
    from medldm.io.discover import scan_folder
    from medldm.io.reader import load_case

    case = scan_folder(mr_scan.parent).cases
    case = next(c for c in case if c.paths[0] == mr_scan)
    img = load_case(case, volume=1)
    with route_warnings():
        lines = print_case_warnings(case, img)
        assert print_case_warnings(case, img) == []  # once per input and text
    assert lines == [f"WARNING {case.source or mr_scan}: volume 1 requested but the image is 3D: ignored"]
    assert capsys.readouterr().err.strip() == lines[0]
    assert print_case_warnings(str(mr_scan), ["two\nlines"]) == [f"WARNING {mr_scan}: two lines"]


def test_bad_voxel_limit_setting_is_a_usage_error(tmp_path, capsys, monkeypatch, no_generate):
    monkeypatch.setenv("MEDLDM_MAX_VOXELS", "many")
    err = _usage_error(capsys, ["synthesize", "-m", "mr-synth-2d", "-n", "1", "-o", str(tmp_path / "o")])
    assert "MEDLDM_MAX_VOXELS: 'many' is not a positive voxel count" in err
