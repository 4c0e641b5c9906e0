"""Ascend C kernel templates (rendered by targets/ascend.py)."""
