"""Kernels for polyport's fused ops, one folder per code generator."""
