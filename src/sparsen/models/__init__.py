from sparsen.models.adapters import GROUP_OF, INPUT_GROUPS, LINEAR_NAMES, Adapter, Block, adapter_for, register_adapter
from sparsen.models.loading import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["GROUP_OF", "INPUT_GROUPS", "LINEAR_NAMES", "Adapter", "Block", "adapter_for", "register_adapter",
           "DEFAULT_MODEL", "LoadedModel", "load_model"]
