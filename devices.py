"""The devices polyport's roofline model knows: peak FLOP/s per dtype, memory bandwidth, memory size.

Every figure is a dense (no structured sparsity) peak from the vendor's
datasheet unless its `notes` say otherwise; tensor-core / matrix-core rates are
used for the dtypes matrix units take (they are what MatMul, Attention and MoE
reach), vector rates for f32 where the matrix unit does not take f32 (NVIDIA:
f32 is "tf32" on tensor cores, which changes numerics, so f32 here is the
CUDA-core rate). Targets refer to these: `DEVICES["h200"]`, and
`TARGET_DEVICES["cuda"]` lists the devices a target's estimates are given for.

A neutral module: the compiler (targets) and the runtime (bench, roofline, the
cpu session's thread count) both read it, and it imports neither.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What the roofline model needs to know about a device."""
    name: str
    peak_flops: Mapping[str, float]      # IR dtype name ("f32", "bf16", ...) -> FLOP/s
    memory_bandwidth: float              # bytes/s
    memory_bytes: int
    notes: str = ""                      # where the numbers come from

    def peak(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops.get("f16" if dtype == "bf16" else "f32", min(self.peak_flops.values()))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), which thread pools should size to."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


T = 1e12
G = 1e9
TB_S = 1e12          # vendors quote TB/s in powers of ten
GB = 10**9


def _host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


H100_SXM = DeviceSpec(
    name="NVIDIA H100 SXM",
    peak_flops={"f64": 67 * T, "f32": 67 * T, "tf32": 494.7 * T, "f16": 989.4 * T, "bf16": 989.4 * T,
                "f8e4m3": 1978.9 * T, "f8e5m2": 1978.9 * T, "i8": 1978.9 * T},
    memory_bandwidth=3.35 * TB_S,
    memory_bytes=80 * GB,
    notes="NVIDIA H100 Tensor Core GPU datasheet, SXM5 column, dense figures (the datasheet's "
          "headline tensor figures are with 2:4 sparsity; halved here): FP64 tensor 67 TF, FP32 67 TF "
          "(CUDA cores), TF32 495 TF, BF16/FP16 989 TF, FP8/INT8 1979; 80 GB HBM3 at 3.35 TB/s.",
)

H200_SXM = DeviceSpec(
    name="NVIDIA H200 SXM",
    peak_flops=dict(H100_SXM.peak_flops),
    memory_bandwidth=4.8 * TB_S,
    memory_bytes=141 * GB,
    notes="NVIDIA H200 Tensor Core GPU datasheet, SXM column, dense figures (sparse headline "
          "figures halved): same compute as H100 SXM (FP32 67 TF, TF32 495 TF, BF16/FP16 989 TF, "
          "FP8 1979 TF); 141 GB HBM3e at 4.8 TB/s.",
)

MI300X = DeviceSpec(
    name="AMD Instinct MI300X",
    peak_flops={"f64": 163.4 * T, "f32": 163.4 * T, "tf32": 653.7 * T, "f16": 1307.4 * T, "bf16": 1307.4 * T,
                "f8e4m3": 2614.9 * T, "f8e5m2": 2614.9 * T, "i8": 2614.9 * T},
    memory_bandwidth=5.3 * TB_S,
    memory_bytes=192 * GB,
    notes="AMD Instinct MI300X data sheet, dense matrix-core figures (sparsity figures excluded): "
          "FP64/FP32 matrix 163.4 TF, TF32 653.7 TF, FP16/BF16 1307.4 TF, FP8/INT8 2614.9; "
          "192 GB HBM3 at 5.3 TB/s.",
)

ASCEND_910B3 = DeviceSpec(
    name="Huawei Ascend 910B3",
    peak_flops={"f16": 313 * T, "bf16": 313 * T, "i8": 626 * T, "f32": 78 * T},
    memory_bandwidth=1.6 * TB_S,
    memory_bytes=64 * GB,
    notes="Huawei publishes no per-SKU datasheet for the 910B line; figures are the commonly cited "
          "910B3 ones (Atlas 800T A2 class): FP16/BF16 cube ~313 TF dense, INT8 ~626 TOPS, 64 GB HBM2e "
          "at ~1.6 TB/s. The FP32 figure (~78 TF, a quarter of FP16) is an ESTIMATE, not a vendor number.",
)

def host_cpu_info() -> dict:
    """`flags` (a set), `vendor_id` and `model name` of the first CPU in /proc/cpuinfo (empty if absent)."""
    info: dict = {"flags": set(), "vendor_id": "", "model name": ""}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not info["flags"]:
                    info["flags"] = set(value.split())
                elif key in ("vendor_id", "model name") and not info[key]:
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def _host_cpu() -> DeviceSpec:
    """This machine's CPU, from what the OS reports: an ESTIMATE, not a datasheet.

    Peak = usable cores x 2 FMA pipes x SIMD f32 lanes (16 with AVX-512, 8 with AVX2,
    4 otherwise) x 2 FLOP per FMA x an assumed 3.0 GHz; bandwidth an assumed ~20 GB/s
    per core (at most 80 GB/s), the share a small VM streams."""
    cores = usable_cpus()
    info = host_cpu_info()
    flags, model = info["flags"], info["model name"] or "x86-64"
    isa, lanes = ("AVX-512", 16) if "avx512f" in flags else ("AVX2", 8) if "avx2" in flags else ("SSE", 4)
    f32 = cores * 2 * lanes * 2 * 3.0e9
    return DeviceSpec(
        name=f"{model}, {cores} vCPU ({isa})",
        peak_flops={"f64": f32 / 2, "f32": f32, "f16": f32, "bf16": f32 * (2 if "avx512_bf16" in flags else 1)},
        memory_bandwidth=min(20e9 * cores, 80e9),
        memory_bytes=_host_memory_bytes(),
        notes=f"ESTIMATE for this machine: {cores} cores x 2 FMA pipes x {lanes} f32 lanes ({isa}) x 2 x "
              "an assumed 3.0 GHz; ~20 GB/s per core of DRAM bandwidth; memory size read from the OS",
    )


HOST_CPU = _host_cpu()

DEVICES: Mapping[str, DeviceSpec] = {
    "h100": H100_SXM,
    "h200": H200_SXM,
    "mi300x": MI300X,
    "910b3": ASCEND_910B3,
    "cpu": HOST_CPU,
}

# Every target, in the one order messages, help texts and listings use.
TARGETS: tuple[str, ...] = ("cpu", "cuda", "rocm", "ascend")

# The devices each target's estimated rows are given for (the first is the target's default).
TARGET_DEVICES: Mapping[str, tuple[str, ...]] = {
    "cuda": ("h100", "h200"),
    "rocm": ("mi300x",),
    "ascend": ("910b3",),
    "cpu": ("cpu",),
}


def target_of(device: str) -> str:
    """The target whose code runs on `device` (a DEVICES key)."""
    for target, names in TARGET_DEVICES.items():
        if device in names:
            return target
    raise KeyError(device)
