from sparsen.measure.stats import ActivationStats, attention_coverage, mass_share

__all__ = ["ActivationStats", "attention_coverage", "mass_share"]
