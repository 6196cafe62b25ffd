from sparsen.methods.runtime import InputSparsifier, ThresholdRule, TopKRule

__all__ = ["InputSparsifier", "ThresholdRule", "TopKRule"]
