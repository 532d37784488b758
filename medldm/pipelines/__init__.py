"""Inference pipelines: model folder + scan in -> scan out (see ``medldm.pipelines.enhance``)."""

from medldm.pipelines.enhance import EnhanceOptions, Enhancer, EnhanceResult, estimate_noise

__all__ = ["EnhanceOptions", "EnhanceResult", "Enhancer", "estimate_noise"]
