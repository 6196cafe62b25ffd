"""Sparsification methods: each calibrates a Plan; a Plan applies to a model through an InputSparsifier."""

from sparsen.methods.plan import Plan, check_sparsity
from sparsen.methods.registry import CalibrationConfig, calibrate, get_method, method_names
from sparsen.methods.runtime import InputSparsifier, ThresholdRule, TopKRule

__all__ = ["Plan", "check_sparsity", "CalibrationConfig", "calibrate", "get_method", "method_names",
           "InputSparsifier", "ThresholdRule", "TopKRule"]
