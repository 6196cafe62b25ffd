from sparsen.methods.runtime import InputSparsifier, ThresholdRule

__all__ = ["InputSparsifier", "ThresholdRule"]
