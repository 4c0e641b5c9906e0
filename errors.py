"""User-facing errors.

Every failure a user can cause (a bad file, an unknown op, a wrong input) is a
`PolyportError` whose message names the file, node, op, dtype or limit at
fault. The CLI prints the message on one line and exits with status 2; any
other exception is a bug in polyport and keeps its traceback.
"""


class PolyportError(Exception):
    """A problem with the user's input, reported without a traceback."""


class ImportError_(PolyportError):
    """The model file could not be imported (missing, truncated, unsupported)."""


class UnsupportedOpError(PolyportError):
    """An op (or an op at an opset) that polyport does not implement."""


class InputError(PolyportError):
    """A runtime input with a wrong name, dtype or rank."""


class ExecutionError(PolyportError):
    """A node failed at run time (a malformed model, or inputs outside what it accepts)."""


class ResourceError(PolyportError):
    """A call that needs more memory than the machine has."""


class ToolchainError(PolyportError):
    """A compiler, linker or library a target needs is missing from this machine."""
