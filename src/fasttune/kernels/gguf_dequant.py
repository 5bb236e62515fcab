"""Dequantisation of GGUF (ggml) tensor blocks: the PyTorch reference (float32) and one Triton kernel.

This is the reference (and CPU) path for reading GGUF files; it is bit-exact with the `gguf` package's numpy
`gguf.quants.dequantize` because it performs the same float32 operations in the same order (products and sums
rounded one at a time, never fused). A tensor is a run of independent blocks along its rows (ggml's innermost
dimension, the last one of the torch shape); each block decodes to `block_size` values. All multi-byte fields are
little-endian; "f16" is IEEE half, widened to float32 before any arithmetic.

Block layouts (bytes) and math, per block:

    F32   4 B/value            x = value
    F16   2 B/value            x = f32(f16)
    BF16  2 B/value            x = the 16 bits as the top half of a float32
    Q8_0  32 values, 34 B:  d:f16 | q[32]:int8                   x_i = q_i * d
    Q4_0  32 values, 18 B:  d:f16 | qs[16]                        q_i = nibble_i,  x_i = d * (q_i - 8)
    Q4_1  32 values, 20 B:  d:f16 | m:f16 | qs[16]                x_i = d * q_i + m
    Q5_0  32 values, 22 B:  d:f16 | qh:u32 | qs[16]               q_i = nibble_i | bit_i(qh) << 4,  x_i = d * (q_i - 16)
    Q5_1  32 values, 24 B:  d:f16 | m:f16 | qh:u32 | qs[16]       x_i = d * q_i + m   (q_i as Q5_0)
      Nibbles of Q4/Q5 "_0/_1": value i < 16 is the low nibble of qs[i], value i >= 16 the high nibble of qs[i-16].

    K-quants: 256-value super-blocks split into sub-blocks that each carry a small integer scale (and min).
    Q2_K  256 values, 84 B:  scales[16] | qs[64] | d:f16 | dmin:f16
          16 sub-blocks of 16; scale = scales[j] & 15, min = scales[j] >> 4; 2-bit q: byte qs[32*h + l] holds, at
          bits 2s..2s+1, value 128*h + 32*s + l.   x = (d * scale) * q - (dmin * min)
    Q3_K  256 values, 110 B: hmask[32] | qs[64] | scales[12] | d:f16
          16 sub-blocks of 16, 6-bit signed scales (low 4 bits from scales[0:8] nibbles, high 2 bits from
          scales[8:12]) minus 32; 2-bit low part as Q2_K; high bit i of value 32*k + l is bit k of hmask[l], and
          the value is q_low - 4 when that bit is 0.   x = (d * scale) * q
    Q4_K  256 values, 144 B: d:f16 | dmin:f16 | scales[12] | qs[128]
          8 sub-blocks of 32 with 6-bit scale sc_j and min m_j packed in 12 bytes: j < 4: sc = s[j] & 63,
          m = s[j+4] & 63; j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4.
          Nibbles: qs[32*h + l] low nibble is value 64*h + l, high nibble value 64*h + 32 + l.
          x = (d * sc_j) * q - (dmin * m_j)
    Q5_K  256 values, 176 B: d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]
          as Q4_K, plus a fifth bit: bit k of qh[l] is the high bit of value 32*k + l.
    Q6_K  256 values, 210 B: ql[128] | qh[64] | scales[16]:int8 | d:f16
          16 sub-blocks of 16 with int8 scales; 6-bit q = low 4 bits | high 2 bits << 4, minus 32. Low nibbles:
          ql[64*h + l] low nibble is value 128*h + l, high nibble value 128*h + 64 + l (l < 64); high bits:
          qh[32*h + l] bits 2s..2s+1 belong to value 128*h + 32*s + l.   x = (d * scale) * q

Two implementations: `dequantize` (plain PyTorch, float32: the CPU path and the test oracle) and
`dequantize_triton` (one Triton kernel for every block format, straight into float32, bfloat16 or float16). The
kernel does the same float32 operations with fused multiply-add disabled, then rounds once to the output dtype
(round to nearest even), so its output equals `dequantize(...).to(dtype)` bit for bit. `dequantize_gguf` picks
between them (Triton on CUDA or FASTTUNE_KERNELS=triton), as every op in fasttune.kernels. No float32 copy of
the whole weight exists on the Triton path: each program decodes ROWS blocks in registers and stores them in the
output dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import round_bf16, tl, triton


@dataclass(frozen=True)
class QuantFormat:
    name: str
    type_id: int  # ggml_type in ggml.h / gguf.GGMLQuantizationType
    block_size: int  # values per block
    type_size: int  # bytes per block


FORMATS = {f.type_id: f for f in (
    QuantFormat("F32", 0, 1, 4), QuantFormat("F16", 1, 1, 2), QuantFormat("Q4_0", 2, 32, 18),
    QuantFormat("Q4_1", 3, 32, 20), QuantFormat("Q5_0", 6, 32, 22), QuantFormat("Q5_1", 7, 32, 24),
    QuantFormat("Q8_0", 8, 32, 34), QuantFormat("Q2_K", 10, 256, 84), QuantFormat("Q3_K", 11, 256, 110),
    QuantFormat("Q4_K", 12, 256, 144), QuantFormat("Q5_K", 13, 256, 176), QuantFormat("Q6_K", 14, 256, 210),
    QuantFormat("BF16", 30, 1, 2),
)}
FORMAT_BY_NAME = {f.name: f for f in FORMATS.values()}

# ggml types this module does not decode, named so an error can say what the file holds
OTHER_GGML_TYPES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


class UnsupportedQuantError(ValueError):
    pass


def quant_format(type_id: int) -> QuantFormat:
    """The block format of ggml type `type_id`, or an error naming it and what is supported."""
    if type_id not in FORMATS:
        name = OTHER_GGML_TYPES.get(type_id, f"unknown ggml type {type_id}")
        raise UnsupportedQuantError(f"{name} is not supported; supported: {', '.join(supported_types())}")
    return FORMATS[type_id]


def supported_types() -> list[str]:
    return [f.name for f in FORMATS.values()]


def nbytes(type_id: int, n_values: int) -> int:
    f = quant_format(type_id)
    if n_values % f.block_size:
        raise ValueError(f"{f.name}: {n_values} values are not a whole number of {f.block_size}-value blocks")
    return n_values // f.block_size * f.type_size


# ---- helpers: every op below is elementwise in float32, one rounding per op as numpy does ------------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) bytes -> (n, k) float32 through IEEE half."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes (n, ..., group) -> (n, ..., 2*group): all low nibbles, then all high nibbles (ggml's order)."""
    qs = qs.contiguous()  # a strided slice of the blocks: bitwise ops on it are ~1.5x slower than the copy costs
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor, shifts: range, width: int) -> torch.Tensor:
    """Bytes (n, g, L) -> (n, g * len(shifts), L): the `width`-bit field at each shift, shift-major."""
    mask = (1 << width) - 1
    return torch.stack([(b >> s) & mask for s in shifts], dim=-2).reshape(b.shape[0], -1, b.shape[-1])


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 packed bytes -> 8 six-bit scales and 8 six-bit mins (n, 8) as float32."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


# ---- per-format block decoders: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ------------------

def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b):
    return _f16(b[:, :2]) * _nibbles(b[:, 4:], 16).float() + _f16(b[:, 2:4])


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes of qh (a little-endian u32) -> bit i for value i, (n, 32)."""
    return torch.stack([(qh >> s) & 1 for s in range(8)], dim=-1).reshape(qh.shape[0], 32)


def _q5_0(b):
    q = (_nibbles(b[:, 6:], 16) | (_q5_high(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _q5_1(b):
    q = _nibbles(b[:, 8:], 16) | (_q5_high(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), range(0, 8, 2), 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = torch.cat([s[:, :8] & 0x0F, s[:, :8] >> 4], dim=-1)  # scale j: nibble of byte j % 8
    high = _bits(s[:, 8:12].reshape(n, 1, 4), range(0, 8, 2), 2).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), range(0, 8, 2), 2).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), range(8), 1).reshape(n, 16, 16) ^ 1  # bit set: no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, 256)


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(n, 4, 32), 32).reshape(n, 8, 32).float()
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, 256)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32), 32).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 32), range(8), 1)
    q = (ql | (qh << 4)).float()
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql.reshape(n, 2, 64), 64).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), range(0, 8, 2), 2)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, 256)


_DECODERS = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k,
             14: _q6_k}


def _checked_bytes(data: torch.Tensor, type_id: int, shape, caller: str):
    """(format, the bytes flattened, number of values) after checking that `data` is the raw uint8 bytes of a
    `type_id` tensor of `shape`."""
    f = quant_format(type_id)
    n_values = 1
    for s in shape:
        n_values *= int(s)
    data = data.reshape(-1)
    if data.dtype != torch.uint8:
        raise TypeError(f"{caller} expects raw uint8 bytes, got {data.dtype}")
    expected = nbytes(type_id, n_values)
    if data.numel() != expected:
        raise ValueError(f"{f.name} tensor of shape {tuple(shape)} needs {expected} bytes, got {data.numel()}")
    return f, data, n_values


def dequantize(data: torch.Tensor, type_id: int, shape: tuple[int, ...] | torch.Size,
               chunk_values: int = 1 << 17) -> torch.Tensor:
    """The float32 tensor of `shape` (torch order: rows last-dim-contiguous) stored as ggml type `type_id` in the
    raw bytes `data` (uint8, any device). Decoded about `chunk_values` values at a time: small temporaries are
    reused by the allocator, large ones cost a fresh zeroed mapping each (measured 2-3x slower on CPU)."""
    f, data, n_values = _checked_bytes(data, type_id, shape, "dequantize")
    if type_id == 0:
        return data.view(torch.float32).clone().reshape(shape)
    if type_id == 1:
        return data.view(torch.float16).float().reshape(shape)
    if type_id == 30:
        return (data.view(torch.int16).to(torch.int32) << 16).view(torch.float32).reshape(shape)
    blocks = data.reshape(-1, f.type_size)
    out = torch.empty(blocks.shape[0], f.block_size, dtype=torch.float32, device=data.device)
    decode = _DECODERS[type_id]
    chunk_blocks = max(1, chunk_values // f.block_size)
    for i in range(0, blocks.shape[0], chunk_blocks):
        out[i:i + chunk_blocks] = decode(blocks[i:i + chunk_blocks])
    return out.reshape(shape)



# ---- Triton: one kernel, every block format; a program decodes ROWS blocks as a (ROWS, NSUB, SUB) tile ---------
# Value v = SUB * j + l of a block (j the sub-block, l < SUB); per-sub-block scales are loaded once as
# (ROWS, NSUB, 1) and broadcast over l. Bytes are loaded one per value (neighbouring lanes read neighbouring or the
# same bytes, so the loads coalesce); f16 fields are assembled from their two little-endian bytes.

_TILE = {  # type_id -> (NSUB, SUB): the tile shape of one block
    8: (1, 32), 2: (2, 16), 3: (2, 16), 6: (2, 16), 7: (2, 16),
    10: (16, 16), 11: (16, 16), 12: (8, 32), 13: (8, 32), 14: (16, 16),
}

if triton is not None:

    @triton.jit
    def _u8(ptr, off, mask):
        return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _f16_field(ptr, off, mask):
        """The little-endian IEEE half at byte `off`, widened to float32 (exact)."""
        bits = _u8(ptr, off, mask) | (_u8(ptr, off + 1, mask) << 8)
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _k_scale_min_field(ptr, s, j, mask):
        """Q4_K / Q5_K: six-bit scale and min of sub-block j (0..7) from the 12 bytes at s (module docstring)."""
        lo = j < 4
        a = _u8(ptr, s + j, mask)  # j < 4: s[j]
        b = _u8(ptr, s + j + 4, mask)  # j < 4: s[j+4]; j >= 4: s[j+4] (bytes 8..11)
        c = _u8(ptr, s + tl.where(lo, j, j - 4), mask)  # j >= 4: s[j-4]
        sc = tl.where(lo, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _dequantize_gguf_kernel(
        blocks_ptr,  # uint8 (num_blocks * TYPE_SIZE,)
        out_ptr,  # (num_blocks * NSUB * SUB,) float32 / bfloat16 / float16
        num_blocks,
        FMT: tl.constexpr,  # ggml type id
        TYPE_SIZE: tl.constexpr,
        NSUB: tl.constexpr,
        SUB: tl.constexpr,
        ROWS: tl.constexpr,  # blocks per program
        OUT_BF16: tl.constexpr,
    ):
        blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        b = (blk * TYPE_SIZE)[:, None, None]  # (ROWS, 1, 1) byte offset of each block
        ok = (blk < num_blocks)[:, None, None]
        j = tl.arange(0, NSUB)[None, :, None]  # (1, NSUB, 1)
        l = tl.arange(0, SUB)[None, None, :]  # (1, 1, SUB)
        okj = ok & (j < NSUB)  # (ROWS, NSUB, 1)
        m = okj & (l < SUB)  # (ROWS, NSUB, SUB)
        if FMT == 8:  # Q8_0
            d = _f16_field(blocks_ptr, b, ok)
            q = tl.load(blocks_ptr + b + 2 + l, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            x = q * d
        elif FMT == 2:  # Q4_0: x = d * (nibble - 8)
            d = _f16_field(blocks_ptr, b, ok)
            q = (_u8(blocks_ptr, b + 2 + l, m) >> (4 * j)) & 15
            x = d * (q - 8).to(tl.float32)
        elif FMT == 3:  # Q4_1: x = d * nibble + m
            d = _f16_field(blocks_ptr, b, ok)
            mn = _f16_field(blocks_ptr, b + 2, ok)
            q = (_u8(blocks_ptr, b + 4 + l, m) >> (4 * j)) & 15
            x = d * q.to(tl.float32) + mn
        elif FMT == 6:  # Q5_0: bit v of the u32 qh is the fifth bit of value v = 16 j + l
            d = _f16_field(blocks_ptr, b, ok)
            hi = (_u8(blocks_ptr, b + 2 + 2 * j + l // 8, m) >> (l % 8)) & 1
            q = ((_u8(blocks_ptr, b + 6 + l, m) >> (4 * j)) & 15) | (hi << 4)
            x = d * (q - 16).to(tl.float32)
        elif FMT == 7:  # Q5_1
            d = _f16_field(blocks_ptr, b, ok)
            mn = _f16_field(blocks_ptr, b + 2, ok)
            hi = (_u8(blocks_ptr, b + 4 + 2 * j + l // 8, m) >> (l % 8)) & 1
            q = ((_u8(blocks_ptr, b + 8 + l, m) >> (4 * j)) & 15) | (hi << 4)
            x = d * q.to(tl.float32) + mn
        elif FMT == 10:  # Q2_K: value 16 j + l = 128 h + 32 s + l2 lives in qs[32 h + l2] at bits 2s
            d = _f16_field(blocks_ptr, b + 80, ok)
            dmin = _f16_field(blocks_ptr, b + 82, ok)
            sm = _u8(blocks_ptr, b + j, okj)
            dl = d * (sm & 15).to(tl.float32)
            ml = dmin * (sm >> 4).to(tl.float32)
            q = (_u8(blocks_ptr, b + 16 + 32 * (j // 8) + 16 * (j % 2) + l, m) >> (2 * ((j % 8) // 2))) & 3
            x = dl * q.to(tl.float32) - ml
        elif FMT == 11:  # Q3_K
            d = _f16_field(blocks_ptr, b + 108, ok)
            low = (_u8(blocks_ptr, b + 96 + j % 8, okj) >> (4 * (j // 8))) & 15
            high = (_u8(blocks_ptr, b + 104 + j % 4, okj) >> (2 * (j // 4))) & 3
            dl = d * ((low | (high << 4)) - 32).to(tl.float32)
            ql = (_u8(blocks_ptr, b + 32 + 32 * (j // 8) + 16 * (j % 2) + l, m) >> (2 * ((j % 8) // 2))) & 3
            hbit = (_u8(blocks_ptr, b + 16 * (j % 2) + l, m) >> (j // 2)) & 1  # value 32 k + l2: bit k of hmask[l2]
            x = dl * (ql - 4 * (1 - hbit)).to(tl.float32)
        elif FMT == 12 or FMT == 13:  # Q4_K / Q5_K: value 32 j + l = 64 h + 32 (j % 2) + l in qs[32 h + l]
            d = _f16_field(blocks_ptr, b, ok)
            dmin = _f16_field(blocks_ptr, b + 2, ok)
            sc, mn = _k_scale_min_field(blocks_ptr, b + 4, j, okj)
            if FMT == 12:
                q = (_u8(blocks_ptr, b + 16 + 32 * (j // 2) + l, m) >> (4 * (j % 2))) & 15
            else:
                q = (_u8(blocks_ptr, b + 48 + 32 * (j // 2) + l, m) >> (4 * (j % 2))) & 15
                q = q | (((_u8(blocks_ptr, b + 16 + l, m) >> j) & 1) << 4)
            x = (d * sc) * q.to(tl.float32) - (dmin * mn)
        else:  # FMT == 14, Q6_K: value 16 j + l = 128 h + 64 n + l4 (low nibble n of ql[64 h + l4])
            d = _f16_field(blocks_ptr, b + 208, ok)
            sc = tl.load(blocks_ptr + b + 192 + j, mask=okj, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            low = (_u8(blocks_ptr, b + 64 * (j // 8) + 16 * (j % 4) + l, m) >> (4 * ((j % 8) // 4))) & 15
            high = (_u8(blocks_ptr, b + 128 + 32 * (j // 8) + 16 * (j % 2) + l, m) >> (2 * ((j % 8) // 2))) & 3
            x = (d * sc) * ((low | (high << 4)) - 32).to(tl.float32)
        out_idx = (blk[:, None, None] * NSUB + j) * SUB + l
        if OUT_BF16:
            # round to nearest even by hand: same bits as the GPU's cvt.rn, and the interpreter's cast truncates
            x = round_bf16(x)
        tl.store(out_ptr + out_idx, x.to(out_ptr.dtype.element_ty), mask=m)


def dequantize_triton(data: torch.Tensor, type_id: int, shape: tuple[int, ...] | torch.Size,
                      dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize(data, type_id, shape).to(dtype)` bit for bit, decoded by one Triton kernel straight into `dtype`
    (or into `out`, contiguous, of `shape`). F32 / F16 / BF16 are converted by PyTorch (no decoding to do)."""
    if triton is None:
        raise RuntimeError("dequantize_triton needs Triton; use dequantize (the PyTorch reference)")
    f, data, n_values = _checked_bytes(data, type_id, shape, "dequantize_triton")
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=data.device)
    elif tuple(out.shape) != tuple(shape) or not out.is_contiguous() or out.device != data.device:
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(shape)} on {data.device}; got "
                         f"{tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    if out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"GGUF weights dequantise to float32, bfloat16 or float16, not {out.dtype}")
    if type_id in (0, 1, 30):  # plain floats: F16 / BF16 widen exactly, so one cast is the single rounding
        src = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[type_id]
        return out.copy_(data.view(src).reshape(out.shape))
    nsub, sub = _TILE[type_id]
    num_blocks = n_values // f.block_size
    rows = max(1, 4096 // f.block_size)  # 4096 values per program
    _dequantize_gguf_kernel[(triton.cdiv(num_blocks, rows),)](
        data, out, num_blocks, FMT=type_id, TYPE_SIZE=f.type_size, NSUB=nsub, SUB=sub, ROWS=rows,
        OUT_BF16=out.dtype == torch.bfloat16, num_warps=4,
        enable_fp_fusion=False,  # (d * sc) * q - dmin * m: separate roundings, as numpy
    )
    return out


def dequantize_gguf(data: torch.Tensor, type_id: int, shape: tuple[int, ...] | torch.Size,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of `shape` in `dtype` stored as ggml type `type_id` in `data`, bit-equal to
    `dequantize(...).to(dtype)`: the Triton kernel on CUDA (or FASTTUNE_KERNELS=triton), else the reference."""
    from . import use_triton  # late import: this module is imported by fasttune.kernels itself

    if use_triton(data) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dequantize_triton(data, type_id, shape, dtype)
    return dequantize(data, type_id, shape).to(dtype)  # CPU, or a float64 oracle (never a training dtype)
