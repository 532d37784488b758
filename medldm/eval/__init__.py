"""Evaluation: pair predictions with references, compute metrics, write reports; classical baselines.

Public API::

    pair_folders(ref, [(name, pred_dir)], mask=None) -> Pairing      # medldm.eval.pairing
    pair_manifest(csv) -> Pairing
    convention_from(data_range=None, window=None) -> Convention       # medldm.eval.evaluate
    evaluate(pairing, EvalOptions(conv, axis=2, ...), out_dir) -> (status, summary)   # medldm.eval.run
    summarize(values, ci="t") -> {"n", "mean", "std", "ci_low", "ci_high", ...}       # medldm.eval.stats
    denoise(vol, method, ...) / denoise_scan(img, method, ...)        # medldm.eval.baselines
    upsample(vol, scale, method, axis) / upsample_scan(img, scale, method, axis)
    run_audit(synthetic, train, holdout, AuditOptions(...), out_dir)  # medldm.eval.audit
"""

_LAZY = {
    "pair_folders": "pairing", "pair_manifest": "pairing", "Pairing": "pairing", "EvalCase": "pairing",
    "convention_from": "evaluate", "Convention": "evaluate", "volume_metrics": "evaluate",
    "slice_metrics": "evaluate", "evaluate": "run", "EvalOptions": "run", "summarize": "stats",
    "denoise": "baselines", "denoise_scan": "baselines", "upsample": "baselines", "upsample_scan": "baselines",
    "estimate_noise_sigma": "baselines", "run_audit": "audit", "AuditOptions": "audit",
}

__all__ = sorted(_LAZY)


def __getattr__(name):  # lazy: keep `import medldm.eval` light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"medldm.eval.{_LAZY[name]}"), name)
    raise AttributeError(name)
