"""Ascend C kernel templates (rendered by targets/ascend/kernels.py)."""
