"""Portable TE computes for the fused ops that have a hand-written cpu kernel (Attention, MoE).

They carry no schedule: the GPU targets schedule them with dlight's rules, which
only reorder and bind loops. Their numerics are checked by building them for
LLVM with TVM's default pipeline and comparing against ONNX Runtime
(tests/targets/test_portable_kernels.py), so a GPU build computes what was checked.
"""
