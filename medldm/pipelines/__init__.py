"""Inference pipelines: model folder + scan in -> scan out (see ``medldm.pipelines.enhance``)."""

from medldm.pipelines.enhance import EnhanceOptions, Enhancer, EnhanceResult

__all__ = ["EnhanceOptions", "EnhanceResult", "Enhancer"]
