"""The portable kernel set: what the GPU targets (cuda, rocm) build, checked on the CPU.

Two kinds:
- TE computes with no schedule (attention.py with a mask, moe.py, quant.py): the GPU targets
  schedule them with dlight's rules, which only reorder and bind loops;
- GPU kernels that bind their own threads (cached_attention.py: decode attention over a KV cache
  and causal attention; cache_update.py; moe_gemv.py: the decode program's MoE), written so that
  no thread reads what another wrote: with `gpu=False` the bound loops are serial and compute the same.

Their numerics are checked by building them for LLVM (the cpu target with kernels="portable",
or the PrimFuncs alone) and comparing against ONNX Runtime and the IR's references
(tests/targets/test_portable_kernels.py, test_cache_kernels.py, test_fused_random.py,
tests/generation/test_generate_portable.py), so a GPU build computes what was checked.
"""
