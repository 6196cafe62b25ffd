"""sparsen: measure, induce and exploit sparsity in transformer language models, on a CPU."""

from sparsen.errors import SparsenError
from sparsen.models import LoadedModel, load_model

__version__ = "0.1.0"
__all__ = ["SparsenError", "LoadedModel", "load_model", "__version__"]
