"""Reading and rewriting the device code inside an exported TVM library, and listing its kernels.

`export_library` packs every imported module into one blob (`__tvm_ffi__library_bin`):

    u64 nbytes | vec<u64> import-tree row_ptr | vec<u64> child indices |
    per module: str kind, then (unless kind == "_lib") bytes payload

A device module's payload (kinds "cuda" and "hip", the ROCm one) is `str fmt | fmap | bytes code`,
where fmap maps each kernel name to its FunctionInfo. Strings, byte strings and
vectors are a u64 length followed by the items (little-endian).

The cuda target uses this to swap the CUDA C++ source that a CUDA-less TVM
build holds for an nvcc fatbin (fmt "fatbin"), which a CUDA-enabled TVM runtime
loads as is. The tests use it to pull the device code back out of model.so and
list the kernels per architecture (cuobjdump for cubins, the ELF symbol table
for HSACO code objects).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..errors import PolyportError

LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise PolyportError("device code blob: truncated (an unexpected TVM serialization format?)")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def bytes_(self) -> bytes:
        return self.raw(self.u64())

    def str_(self) -> str:
        return self.bytes_().decode()

    def u64_vec(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]


def _pack_bytes(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


@dataclasses.dataclass
class DeviceModule:
    """One device module of a library blob: format, kernel names, code, and the raw fmap bytes."""
    kind: str
    fmt: str
    kernels: list[str]
    code: bytes
    fmap: bytes

    def payload(self) -> bytes:
        return _pack_bytes(self.fmt.encode()) + self.fmap + _pack_bytes(self.code)


def parse_device_payload(kind: str, payload: bytes) -> DeviceModule:
    r = _Reader(payload)
    fmt = r.str_()
    start = r.pos
    kernels = []
    for _ in range(r.u64()):                # FunctionInfo: name, arg dtypes, launch tags, extra arg tags
        kernels.append(r.str_())
        r.str_()
        r.raw(4 * r.u64())
        for _ in range(r.u64()):
            r.str_()
        r.raw(4 * r.u64())
    fmap = payload[start:r.pos]
    code = r.bytes_()
    if r.pos != len(payload):
        raise PolyportError(f"{kind} device module: {len(payload) - r.pos} trailing bytes "
                            "(an unexpected TVM serialization format?)")
    return DeviceModule(kind, fmt, kernels, code, fmap)


def map_library_bin(blob: bytes, fn: Callable[[str, bytes], bytes]) -> bytes:
    """Rewrite a library blob (with its u64 size prefix), passing each module payload through fn(kind, payload)."""
    r = _Reader(blob)
    size = r.u64()
    if size != len(blob) - 8:
        raise PolyportError(f"library blob: size field {size} != {len(blob) - 8}")
    head_start = r.pos
    r.u64_vec()
    r.u64_vec()
    out = [blob[head_start:r.pos]]
    while r.pos < len(blob):
        kind = r.str_()
        out.append(_pack_bytes(kind.encode()))
        if kind != "_lib":
            out.append(_pack_bytes(fn(kind, r.bytes_())))
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body


def device_modules(blob: bytes, kinds: tuple[str, ...] = ("cuda", "hip")) -> list[DeviceModule]:
    found: list[DeviceModule] = []

    def visit(kind, payload):
        if kind in kinds:
            found.append(parse_device_payload(kind, payload))
        return payload

    map_library_bin(blob, visit)
    return found


def library_bin_from_c(c_source: str) -> tuple[str, bytes]:
    """(symbol, blob) from the C text `ModulePackImportsToC` writes."""
    m = re.search(r"const unsigned char (\w+)\[\d+\] = \{", c_source)
    if not m:
        raise PolyportError("packed imports: no library blob array in TVM's C output")
    body = c_source[m.end():c_source.index("};", m.end())]
    return m.group(1), bytes.fromhex(body.replace("0x", "").replace(",", "").replace("\n", "").replace(" ", ""))


def library_bin_asm(symbol: str, blob_path: Path) -> str:
    """Assembly that defines `symbol` as the bytes of blob_path (an .incbin: no multi-megabyte C array to compile)."""
    return (f'    .section .rodata\n    .globl {symbol}\n    .type {symbol}, @object\n    .p2align 4\n'
            f'{symbol}:\n    .incbin "{blob_path}"\n    .size {symbol}, .-{symbol}\n'
            '    .section .note.GNU-stack,"",@progbits\n')


# ---- reading an exported model.so ---------------------------------------------------------
def _elf_symbol(data: bytes, name: str) -> tuple[int, int]:
    """(file offset, size) of a defined data symbol in an ELF64 little-endian shared object."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise PolyportError("not an ELF64 little-endian file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for s in secs:
        if s[1] not in (2, 11):                   # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = secs[s[6]]
        for off in range(s[4], s[4] + s[5], s[9]):
            st_name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, off)
            end = data.index(b"\0", strtab[4] + st_name)
            if data[strtab[4] + st_name:end].decode() == name and shndx:
                sec = secs[shndx]
                return value - sec[3] + sec[4], size
    raise PolyportError(f"no symbol {name}")


def library_bin_from_so(path: str | os.PathLike) -> bytes:
    data = Path(path).read_bytes()
    try:
        off, size = _elf_symbol(data, LIBRARY_BIN_SYMBOL)
    except PolyportError as e:
        raise PolyportError(f"{path}: {e}") from None
    blob = data[off:off + size]
    (n,) = struct.unpack_from("<Q", blob)
    return blob[:8 + n]


# ---- listing kernels in device code -------------------------------------------------------
def find_cuobjdump() -> Optional[str]:
    """cuobjdump on PATH, in the CUDA toolkit, or from the nvidia-cuda-cuobjdump wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    cands = [Path(os.environ.get("CUDA_PATH", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    for site in sys.path:
        cands += sorted(Path(site).glob("nvidia/cu*/bin/cuobjdump")) if site and Path(site).is_dir() else []
    return next((str(c) for c in cands if c.is_file() and os.access(c, os.X_OK)), None)


def cubin_kernels(fatbin: bytes) -> dict[str, list[str]]:
    """{"sm_90": [kernel, ...], "compute_90": ["<ptx>"]}: the cubins (with their global functions) and PTX in a fatbin."""
    tool = find_cuobjdump()
    if tool is None:
        raise PolyportError("cuobjdump not found: run scripts/install_gpu_toolchains.sh (pip nvidia-cuda-cuobjdump)")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "device.fatbin"
        path.write_bytes(fatbin)
        listing = _run([tool, "--list-elf", "--list-ptx", str(path)])
        out: dict[str, list[str]] = {}
        for m in re.finditer(r"PTX file\s+\d+:\s+\S*?(sm_\d+a?)\.ptx", listing):
            out["compute_" + m.group(1)[3:]] = ["<ptx>"]
        syms = _run([tool, "-symbols", str(path)])
    # each embedded cubin's listing starts with a header naming its arch; kernels are its global ENTRY functions
    for part in re.split(r"\n(?=Fatbin (?:elf|ptx) code:)", syms):
        arch = re.search(r"\barch = (sm_\d+a?)", part)
        if arch and part.startswith("Fatbin elf code:"):
            names = re.findall(r"FUNC\s+GLOBAL\s+\S+\s+ENTRY\s+(\S+)", part)
            out.setdefault(arch.group(1), []).extend(names)
    return out


def hsaco_kernels(code: bytes) -> dict[str, list[str]]:
    """{"gfx942": [kernel, ...]}: the target from the ELF's AMDGPU notes, kernels from their `.kd` descriptors."""
    tool = shutil.which("llvm-readelf") or shutil.which("readelf")
    if tool is None:
        raise PolyportError("readelf not found (install binutils or llvm)")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "device.hsaco"
        path.write_bytes(code)
        text = _run([tool, "--notes", "--syms", "--wide", str(path)])
    m = re.search(r"amdhsa\.target:\s+'?amdgcn-amd-amdhsa-\S*?(gfx[0-9a-f]+)", text)
    if not m:
        raise PolyportError("HSACO: no amdhsa target in the ELF notes")
    names = sorted({s[:-3] for s in re.findall(r"\s(\S+\.kd)\s*$", text, re.M)})
    return {m.group(1): names}


def _run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise PolyportError(f"{' '.join(cmd)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout
