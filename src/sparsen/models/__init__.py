from sparsen.models.adapters import GROUP_OF, INPUT_GROUPS, LINEAR_NAMES, adapter_for
from sparsen.models.loading import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["GROUP_OF", "INPUT_GROUPS", "LINEAR_NAMES", "adapter_for", "DEFAULT_MODEL", "LoadedModel", "load_model"]
