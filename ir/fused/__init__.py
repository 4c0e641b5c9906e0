"""polyport's fused ops (domain `polyport`): what every target lowers to fast kernels.

Each module declares one op family once: schema, type inference and the NumPy
reference that defines its meaning. References compute in fp32 and return the
input's dtype. Importing this package registers them all.
"""
from . import attention, cache, mlp, moe, norm, quant, rotary  # noqa: F401
