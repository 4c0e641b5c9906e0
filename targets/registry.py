"""Imports every target so that `register_target` has seen them all."""
from . import ascend  # noqa: F401
from . import cpu  # noqa: F401
from . import cuda  # noqa: F401
from . import rocm  # noqa: F401
