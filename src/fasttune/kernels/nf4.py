"""NF4 (4-bit NormalFloat) quantisation with double-quantised scales, bit-compatible with bitsandbytes.

Quantise (once, at load) a weight w flattened to x[0..n), blocks of B = 64 values:
    a_k    = max_{i in block k} |x_i|                               (float32 absmax of block k; the last block
                                                                     may be partial and uses its real values)
    q_i    = argmin_c |NF4[c] - clamp(x_i / a_k, -1, 1)|           (ties go to the lower code, as bitsandbytes'
                                                                     bucketize over the table's midpoints)
    packed = q_{2j} << 4 | q_{2j+1}                                 (first element in the HIGH nibble; an odd
                                                                     tail is padded with the code of 0.0)
Double quantisation of the n/64 scales (blocks of B2 = 256 scales):
    offset = mean_k a_k;   r_k = a_k - offset
    A_m    = max_{k in block m} |r_k|                               (float32, "absmax2" / nested_absmax)
    aq_k   = argmin_c |DYN8[c] - clamp(r_k / A_m, -1, 1)|           (bitsandbytes' signed dynamic 8-bit map)
Dequantise (what the Triton kernel does in one pass, float32 arithmetic, no fused multiply-add):
    a_k = DYN8[aq_k] * A_{k // 256} + offset;   x_i = NF4[q_i] * a_{i // 64}   -> cast to the output dtype
The maximum error is half the largest gap of the NF4 table times a_k (plus the 8-bit error of a_k itself).
A range of whole blocks (some experts of a stack: `NF4Tensor.dequantize_rows`) dequantises alone, each block k
by its index in the whole tensor: the same values as dequantising everything and slicing.

Storage follows bitsandbytes' ``Params4bit`` / ``QuantState`` (``compress_statistics=True``): packed uint8 of
shape (ceil(n/2), 1), absmax uint8 (n/64), nested_absmax float32 (n/64/256), offset float32, and the serialized
keys ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4`` (JSON bytes) written by bitsandbytes / transformers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ._triton import round_bf16, tl, triton
from .dynamic_map import create_dynamic_map

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), sorted, so the code index is the table position.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


DYNAMIC_CODE = create_dynamic_map()
NESTED_BLOCKSIZE = 256


@dataclass
class NF4Tensor:
    """A weight quantised to NF4 with double-quantised absmax (bitsandbytes layout)."""

    packed: torch.Tensor  # uint8 (ceil(numel/2), 1): two codes per byte, first in the high nibble
    absmax_q: torch.Tensor  # uint8 (ceil(numel/blocksize),): 8-bit codes of absmax - offset
    absmax2: torch.Tensor  # float32 (ceil(numel/blocksize/256),): scale of each 256-block of absmax_q
    offset: torch.Tensor  # float32 (): mean of the first-level absmax
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original weight (and of dequantize()'s output)
    blocksize: int = 64
    blocksize2: int = NESTED_BLOCKSIZE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `self.dtype` (or into `out`). `dtype` (models.quantized's protocol) is honoured directly
        only when that is the same rounding: a float32 original dequantised straight into `dtype`; otherwise the
        caller casts the `self.dtype` result (a bf16 original read in float32 must keep its bf16 values)."""
        if out is None and dtype in (torch.bfloat16, torch.float16) and self.dtype == torch.float32:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        return dequantize_nf4(self, out)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows start:stop of the first dimension (experts start:stop of a 3-D stack) dequantised, shape
        (stop - start, *shape[1:]): the same values as `dequantize()[start:stop]` without the rest (a grouped GEMM
        dequantises an expert stack a few experts at a time). `dtype` as in `dequantize`. A row must span whole
        quantisation blocks (`rows_dequantizable`)."""
        if not self.rows_dequantizable:
            raise ValueError(f"NF4 rows of {math.prod(self.shape[1:])} values do not span whole blocks of "
                             f"{self.blocksize}: dequantise the whole tensor")
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"rows {start}:{stop} out of range for {self.shape[0]} rows")
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) and self.dtype == torch.float32 else self.dtype
        out = torch.empty((stop - start, *self.shape[1:]), dtype=out_dtype, device=self.device)
        return dequantize_nf4(self, out, start * math.prod(self.shape[1:]))

    @property
    def rows_dequantizable(self) -> bool:
        """Whether `dequantize_rows` applies: rows (of the first dimension) of whole quantisation blocks."""
        return len(self.shape) >= 2 and math.prod(self.shape[1:]) % self.blocksize == 0

    @classmethod
    def empty(cls, shape, dtype: torch.dtype, device="meta", blocksize: int = 64) -> "NF4Tensor":
        """The tensors `quantize_nf4` returns for a weight of `shape`, uninitialised (on the meta device: no
        memory): the layout a model will hold once loaded in 4 bits, for memory accounting before loading."""
        n = math.prod(shape)
        blocks = -(-n // blocksize)
        return cls(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device),
                   torch.empty(blocks, dtype=torch.uint8, device=device),
                   torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
                   torch.empty((), dtype=torch.float32, device=device), torch.Size(shape), dtype, blocksize,
                   NESTED_BLOCKSIZE)

    def to(self, device) -> "NF4Tensor":
        return NF4Tensor(self.packed.to(device), self.absmax_q.to(device), self.absmax2.to(device),
                         self.offset.to(device), self.shape, self.dtype, self.blocksize, self.blocksize2)


def _blockwise_codes(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of x / absmax per block, exactly as bitsandbytes' reference op (bitsandbytes::quantize_4bit /
    quantize_blockwise "default" kernels): full blocks multiply by the reciprocal, the partial tail divides."""
    n = x.numel()
    full = n - n % blocksize
    absmax = x[:full].reshape(-1, blocksize).abs().amax(dim=1)
    scaled = torch.clamp(x[:full].reshape(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1)
    scaled = scaled.reshape(-1)
    if full < n:
        tail_absmax = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / tail_absmax, -1, 1)])
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8), absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, chunk_elements: int = 1 << 24) -> NF4Tensor:
    """Quantise ``w`` (bf16/fp16/fp32, any shape, CPU or GPU) to NF4 with double-quantised absmax.

    Works through `chunk_elements` values at a time (whole blocks, so the result is the same bits): the float32
    copy and the int32 codes of a whole tensor would cost 8-10 bytes per value on top of the weight, which for a
    gpt-oss expert stack (265M values) is more than the rest of a 16 GB QLoRA budget."""
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"quantize_nf4 expects a bf16/fp16/fp32 tensor, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("quantize_nf4: cannot quantise an empty tensor")
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize}")
    x = w.detach().reshape(-1)
    n = x.numel()
    chunk = max(blocksize, chunk_elements - chunk_elements % blocksize)  # whole blocks: an even count
    code = NF4_CODE.to(x.device)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmaxes = []
    for start in range(0, n, chunk):
        codes, absmax = _blockwise_codes(x[start:start + chunk].float(), code, blocksize)
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), 7)])  # pad: code of 0.0, as bitsandbytes
        packed[start // 2:start // 2 + codes.numel() // 2, 0] = (codes[0::2] << 4) | codes[1::2]
        absmaxes.append(absmax)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    offset = absmax.mean()
    absmax_q, absmax2 = _blockwise_codes(absmax - offset, DYNAMIC_CODE.to(x.device), NESTED_BLOCKSIZE)
    return NF4Tensor(packed, absmax_q, absmax2, offset, w.shape, w.dtype, blocksize, NESTED_BLOCKSIZE)


def _check_out(q: NF4Tensor, out: torch.Tensor | None, start: int = 0) -> torch.Tensor:
    """`out` for values start:start + out.numel() of q (the whole tensor by default): contiguous, on q's device,
    a float dtype; a range starts on a block and ends on one or at the end."""
    if out is None:
        if start:
            raise ValueError("a range of an NF4 tensor is dequantised into an `out` of its size")
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    in_range = (start % q.blocksize == 0 and start + out.numel() <= q.numel
                and ((start + out.numel()) % q.blocksize == 0 or start + out.numel() == q.numel))
    ok = in_range and (out.numel() != q.numel or out.shape == q.shape)
    if not ok or not out.is_contiguous() or out.device != q.device:
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(q.shape)} on {q.device} (or, from a start "
                         f"on a block, of whole blocks); got {tuple(out.shape)} from {start} on {out.device} "
                         f"(contiguous={out.is_contiguous()})")
    if out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"out must be bf16/fp16/fp32, got {out.dtype}")
    return out


def dequantize_nf4_reference(q: NF4Tensor, out: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Plain PyTorch dequantisation (the CPU path and the test oracle); with `start`, values start:start +
    out.numel() into `out`."""
    out = _check_out(q, out, start)
    n = out.numel()
    first = start // q.blocksize
    blocks = torch.arange(first, first + -(-n // q.blocksize), device=q.device)
    absmax = DYNAMIC_CODE.to(q.device)[q.absmax_q[blocks].long()] * q.absmax2[blocks // q.blocksize2]
    absmax = absmax + q.offset  # separate op: no fused multiply-add, like bitsandbytes
    byte = q.packed.reshape(-1)[start // 2:(start + n + 1) // 2]
    codes = torch.stack([byte >> 4, byte & 0xF], dim=1).reshape(-1)[:n].long()
    values = NF4_CODE.to(q.device)[codes]
    pad = absmax.numel() * q.blocksize - n
    values = torch.nn.functional.pad(values, (0, pad)).reshape(-1, q.blocksize) * absmax.view(-1, 1)
    out.copy_(values.reshape(-1)[:n].reshape(out.shape))  # float32 -> out dtype, round to nearest even
    return out


if triton is not None:

    @triton.jit
    def _dequantize_nf4_kernel(
        packed_ptr,  # uint8 (ceil(n/2),)
        absmax_q_ptr,  # uint8 (num_blocks,)
        absmax2_ptr,  # float32 (ceil(num_blocks / BLOCKSIZE2),)
        offset_ptr,  # float32 ()
        nf4_ptr,  # float32 (16,)
        dyn8_ptr,  # float32 (256,)
        out_ptr,
        n,  # values written: out[0:n] = the tensor's values first_block * BLOCKSIZE + (0:n)
        n_end,  # first_block * BLOCKSIZE + n: where the range ends in the whole tensor
        num_blocks,  # blocks of the range
        first_block,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        ROWS: tl.constexpr,  # quantisation blocks per program
        OUT_BF16: tl.constexpr,
    ):
        HALF: tl.constexpr = BLOCKSIZE // 2
        local = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) blocks of the range
        block_ok = local < num_blocks
        blocks = local + first_block  # blocks of the whole tensor
        # second-level dequantisation of the block scales (float32; fp fusion disabled at launch)
        aq = tl.load(absmax_q_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=block_ok, other=0.0)
        absmax = tl.load(dyn8_ptr + aq) * a2 + tl.load(offset_ptr)
        # one row of HALF packed bytes per block
        byte_idx = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (n_end + 1) // 2, other=0)
        hi = tl.load(nf4_ptr + (byte >> 4).to(tl.int32)) * absmax[:, None]
        lo = tl.load(nf4_ptr + (byte & 0xF).to(tl.int32)) * absmax[:, None]
        values = tl.interleave(hi, lo)  # (ROWS, BLOCKSIZE): element 2j from the high nibble
        out_idx = local[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if OUT_BF16:
            # round to nearest even by hand: same bits as the GPU's cvt.rn, and the interpreter's cast truncates
            values = round_bf16(values)
        tl.store(out_ptr + out_idx, values.to(out_ptr.dtype.element_ty), mask=out_idx < n)

    _TABLES: dict = {}

    def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in _TABLES:
            _TABLES[device] = (NF4_CODE.to(device), DYNAMIC_CODE.to(device))
        return _TABLES[device]


def dequantize_nf4_triton(q: NF4Tensor, out: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("dequantize_nf4_triton needs Triton; use dequantize_nf4_reference")
    out = _check_out(q, out, start)
    n = out.numel()
    num_blocks = -(-n // q.blocksize)
    nf4, dyn8 = _tables(q.device)
    rows = max(1, 4096 // q.blocksize)  # 4096 outputs per program
    _dequantize_nf4_kernel[(triton.cdiv(num_blocks, rows),)](
        q.packed, q.absmax_q, q.absmax2, q.offset, nf4, dyn8, out, n, start + n, num_blocks, start // q.blocksize,
        BLOCKSIZE=q.blocksize, BLOCKSIZE2=q.blocksize2, ROWS=rows, OUT_BF16=out.dtype == torch.bfloat16, num_warps=4,
        enable_fp_fusion=False,  # keep (code * absmax2) + offset two roundings, as bitsandbytes
    )
    return out


def dequantize_nf4(q: NF4Tensor, out: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Dequantise to ``q.dtype`` (or into ``out``; with `start`, the values start:start + out.numel(), from a block
    boundary): Triton on CUDA (or FASTTUNE_KERNELS=triton), else PyTorch."""
    from . import use_triton  # late import: this module is imported by fasttune.kernels itself

    if use_triton(q.packed):
        return dequantize_nf4_triton(q, out, start)
    return dequantize_nf4_reference(q, out, start)


# ---- bitsandbytes serialized form (Params4bit / QuantState.as_dict(packed=True)) -------------------------

_QS_KEY = "quant_state.bitsandbytes__nf4"


def to_bnb_state_dict(q: NF4Tensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes / transformers save for a 4-bit NF4 weight with double quantisation."""
    meta = {  # same keys, order and formatting as QuantState.as_dict
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).removeprefix("torch."),
        "shape": tuple(q.shape),
        "nested_blocksize": q.blocksize2,
        "nested_dtype": "float32",
        "nested_offset": q.offset.item(),
    }
    return {
        prefix: q.packed,
        f"{prefix}.absmax": q.absmax_q,
        f"{prefix}.quant_map": NF4_CODE.to(q.device),
        f"{prefix}.nested_absmax": q.absmax2,
        f"{prefix}.nested_quant_map": DYNAMIC_CODE.to(q.device),
        f"{prefix}.{_QS_KEY}": torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8),
    }


def from_bnb_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
    """Read an NF4 weight saved by bitsandbytes / transformers (``load_in_4bit`` with double quantisation)."""
    key = f"{prefix}.{_QS_KEY}"
    if key not in state_dict:
        found = [k for k in state_dict if k.startswith(prefix + ".quant_state.")]
        raise ValueError(f"no {key!r} in the state dict (found {found or 'none'}); only NF4 weights are supported")
    meta = json.loads(bytes(state_dict[key].cpu().tolist()).decode("utf-8"))
    if f"{prefix}.nested_absmax" not in state_dict:
        raise NotImplementedError(f"{prefix}: NF4 without double quantisation (bnb_4bit_use_double_quant=False) "
                                  f"is not supported; re-quantise from the original weights with quantize_nf4")
    packed = state_dict[prefix]
    device = packed.device
    for name, expected in (("quant_map", NF4_CODE), ("nested_quant_map", DYNAMIC_CODE)):
        table = state_dict.get(f"{prefix}.{name}")
        if table is not None and not torch.equal(table.float().cpu(), expected):
            raise ValueError(f"{prefix}.{name} differs from bitsandbytes' standard table; cannot load it as NF4")
    if packed.dtype != torch.uint8:  # bnb's quant_storage option stores the same bytes in another dtype
        packed = packed.contiguous().view(torch.uint8)
    return NF4Tensor(
        packed=packed.reshape(-1, 1),
        absmax_q=state_dict[f"{prefix}.absmax"].reshape(-1),
        absmax2=state_dict[f"{prefix}.nested_absmax"].float().reshape(-1),
        offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device),
        shape=torch.Size(meta["shape"]),
        dtype=getattr(torch, meta["dtype"]),
        blocksize=int(meta["blocksize"]),
        blocksize2=int(meta["nested_blocksize"]),
    )
