"""What every Triton kernel file shares: the optional import, output allocation and the launch sizes of row kernels.

Triton is optional (CPU-only installs run the plain-PyTorch references): `triton` and `tl` are None without it, and
each kernel file defines its kernels under `if triton is not None:`.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: only the references are usable
    triton = None
    tl = None

AVAILABLE = triton is not None

# Largest row a row kernel (RMSNorm, LayerNorm) holds in registers at once (Liger uses 64 KiB / element size); wider
# rows loop over column blocks. Tests lower it to exercise the looped path on small widths.
MAX_BLOCK = 16384


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation, one place so tests can poison it (fill with NaN) to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def block_and_warps(n_cols: int) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, single_block) for a row of n_cols elements."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps, block >= n_cols


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (cached by torch: no sync); 4 elsewhere (the CPU interpreter), for launch shapes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def num_programs(device: torch.device, n_rows: int, per_sm: int = 1) -> int:
    """Persistent-grid size for row reductions: `per_sm` programs per SM on CUDA (a few in the CPU interpreter),
    at most one per row (or per tile of rows, for a kernel that walks tiles)."""
    return max(1, min(multiprocessors(device) * per_sm, n_rows))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (rows, H) with unit column stride, copying only when a view is impossible."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


if triton is not None:

    @triton.jit
    def round_bf16(x):
        """float32 x rounded to the nearest bfloat16 (ties to even), still as float32: the GPU's cvt.rn bits, done by
        hand because the interpreter's float32 -> bfloat16 cast truncates. Finite x (NaN payloads are not kept)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
else:
    round_bf16 = None
