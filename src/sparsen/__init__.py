"""sparsen: measure, induce and exploit sparsity in transformer language models, on a CPU.

The API (``sparsen.api``) is imported on first use, so that ``sparsen --help`` stays fast:

    import sparsen
    lm = sparsen.load_model("smollm2")
    plan = sparsen.calibrate(lm, sparsen.TealConfig(sparsity=0.5))
    sparsen.sparsify_(lm, plan)
    print(sparsen.evaluate(lm, protocol="decode", windows=4).ppl)
"""

from sparsen.errors import SparsenError

__version__ = "0.1.0"

_API = {
    "sparsen.api": ("calibrate", "sparsify_", "unsparsify_", "evaluate", "profile", "Profile", "EvalResult", "Plan",
                    "Sparsifier", "config_for", "method_names", "Engine"),
    "sparsen.models": ("LoadedModel", "load_model"),
    "sparsen.methods": ("MethodConfig", "TealConfig", "CatsConfig", "ChessConfig", "WinaConfig", "RSparseConfig",
                        "StatTopKConfig", "TopKConfig", "RotateConfig", "RotateWinaConfig", "RotateTopKConfig", "MoefyConfig"),
}
_WHERE = {name: module for module, names in _API.items() for name in names}

__all__ = ["SparsenError", "__version__", *_WHERE]


def __getattr__(name):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsen' has no attribute '{name}'")


def __dir__():
    return sorted(__all__)
