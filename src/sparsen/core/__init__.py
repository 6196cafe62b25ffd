"""The core every capability plugs into: sites, typed rules, the hooks that apply them, plans with
registered transforms, and accounting. It imports nothing from ``methods`` (a test keeps it so)."""

from sparsen.core.accounting import Tally, achieved
from sparsen.core.hooks import Sparsifier, register_installer
from sparsen.core.plan import PLAN_FORMAT, Plan
from sparsen.core.rules import (
                                GateActRule,
                                GaussianTopKRule,
                                LowRankCompensated,
                                RuleKind,
                                ThresholdRule,
                                TopKRule,
                                check_sparsity,
                                rule_from_entry,
)
from sparsen.core.sites import Site, SiteKind, model_sites, register_site_kind
from sparsen.core.transforms import Transform, get_transform, register_transform

__all__ = ["Tally", "achieved", "Sparsifier", "register_installer", "PLAN_FORMAT", "Plan", "GateActRule",
           "GaussianTopKRule", "LowRankCompensated", "RuleKind", "ThresholdRule", "TopKRule", "check_sparsity",
           "rule_from_entry", "Site", "SiteKind", "model_sites", "register_site_kind", "Transform", "get_transform",
           "register_transform"]
