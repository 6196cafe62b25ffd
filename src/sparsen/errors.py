"""The one exception type users see: the CLI prints its message on one line and exits 2."""


class SparsenError(Exception):
    """Bad input or an unsupported request; the message says what to do."""


class UnreachableSparsity(SparsenError):
    """A method cannot reach the requested model-wide sparsity (it leaves too many linears dense)."""
