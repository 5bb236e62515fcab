"""llama.cpp's K-quant block formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), quantised in-process with numpy, bit for bit
as llama.cpp's reference quantiser (`quantize_row_qN_K_ref` in ggml-quants.c, the path `llama-quantize` takes
without an importance matrix).

Every format cuts a row into super-blocks of 256 values and each super-block into sub-blocks (16 of 16 values, or
8 of 32). A sub-block gets its own scale (and, for Q2_K/Q4_K/Q5_K, a minimum); those are themselves quantised
against one fp16 super-scale `d` (and `dmin`), then each value is re-quantised against its decoded scale:

    Q2_K  x ~ d*sc*q - dmin*m       q in 0..3,   16 sub-blocks of 16, sc/m 4-bit      84 bytes / 256 values
    Q3_K  x ~ d*(sc-32)*(q-4)       q in 0..7,   16 sub-blocks of 16, sc 6-bit        110 bytes
    Q4_K  x ~ d*sc*q - dmin*m       q in 0..15,  8 sub-blocks of 32, sc/m 6-bit       144 bytes
    Q5_K  x ~ d*sc*q - dmin*m       q in 0..31,  8 sub-blocks of 32, sc/m 6-bit       176 bytes
    Q6_K  x ~ d*sc*(q-32)           q in 0..63,  16 sub-blocks of 16, sc int8         210 bytes

Per-sub-block fits (as ggml's helpers):
- with a minimum (Q2_K, Q4_K, Q5_K: make_qkx2_quants): start from the min/max grid, then try nstep+1 stretched
  grids iscale = (nmax + rmin + rdelta*i) / (max - min); for each, solve the weighted least-squares scale and
  minimum for the codes it gives and keep it if its weighted error (squared, or absolute for Q2_K) is lower. The
  weights are |x| (Q2_K) or rms(sub-block) + |x| (Q4_K, Q5_K). The search is sequential: an accepted candidate
  moves `min`, which the next grid uses.
- symmetric (Q6_K: make_qx_quants): grid -nmax/max (max = the value of largest magnitude, signed), then 18 grids
  -(nmax + 0.1*i)/max, i = -9..9; keep the one maximising (sum w x l)^2 / sum w l^2 with w = x^2.
- Q3_K (make_q3_quants): the -4/max grid, then up to 5 sweeps of coordinate descent on each code.

Bit-exactness: all arithmetic is float32 in the C expression order; sums are accumulated sequentially (never
numpy's pairwise sum), nearest_int is round-half-even (np.rint), fp16 rounding is round-to-nearest-even, the
sequential "keep if better" searches are replayed candidate by candidate with per-sub-block masks. llama.cpp
built with FMA contraction of `a += w*x` (-march=native with GCC's default -ffp-contract=fast) can round some
sums differently and so, rarely, pick another candidate; the oracle for this module is the strict-float32 C.

Speed: every sub-block's search runs as whole-array numpy operations over a chunk of super-blocks; chunks run in
a thread pool (numpy releases the GIL). Measured throughput is in tests/test_export_gguf_kquants.py's docstring.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
# bytes per 256-value super-block, by ggml type name
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_CHUNK_BLOCKS = 4096  # super-blocks per work item: ~4 MB of float32, large enough to amortise numpy's call cost


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 as the C loops do: ((a0 + a1) + a2) + ..., each step rounded to float32."""
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def _fp16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=F32).astype(np.float16)


def _columns(x: np.ndarray, n: int) -> np.ndarray:
    """(blocks, 256) -> (n, blocks * 256/n): one column per sub-block, so per-sub-block sums run along axis 0."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _rows(a: np.ndarray, nsub: int) -> np.ndarray:
    """Inverse of _columns for codes: (n, blocks * nsub) -> (blocks, 256)."""
    return a.T.reshape(-1, nsub * a.shape[0])


# ---- per-sub-block fits ---------------------------------------------------------------------------------------

def _fit_with_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                  use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants over columns: codes L (n, S), scale (S,) and the positive minimum (S,) [x ~ scale*L - min]."""
    mn = np.minimum(x.min(axis=0), F32(0))
    mx = x.max(axis=0)
    flat = mx == mn
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    fnmax = F32(nmax)

    def err(scale, lo, codes):
        d = scale * codes + lo - x
        return _seqsum(w * (np.abs(d) if use_mad else d * d))

    rng = mx - mn
    iscale = fnmax / rng
    scale = F32(1) / iscale
    L = np.clip(np.rint(iscale * (x - mn)), 0, nmax)
    best = err(scale, mn, L)
    for i in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(i) + fnmax) / (mx - mn)
        codes = np.clip(np.rint(iscale * (x - mn)), 0, nmax)
        wl = w * codes
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * codes), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, this_min, codes)
        take = (D > 0) & (cur < best)
        L = np.where(take, codes, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    L = np.where(flat, F32(0), L)
    scale = np.where(flat, F32(0), scale)
    return L, scale, -mn


def _signed_max(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first value of largest magnitude along `axis` (signed) and its magnitude, as the C `if (ax > amax)`."""
    idx = np.expand_dims(np.argmax(np.abs(x), axis=axis), axis)
    mx = np.take_along_axis(x, idx, axis=axis).squeeze(axis)
    return mx, np.abs(mx)


def _fit_symmetric(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1, no weights) over columns: codes L in [0, 2 nmax) and the signed scale."""
    mx, amax = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    fnmax = F32(nmax)

    def codes_for(iscale):
        return np.clip(np.rint(iscale * x), -nmax, nmax - 1)

    def sums(codes):
        return _seqsum(wx * codes), _seqsum(w * codes * codes)

    codes = codes_for(-fnmax / mx)
    sumlx, suml2 = sums(codes)
    L = codes + fnmax
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        codes = codes_for(-(fnmax + F32(0.1) * F32(i)) / mx)
        sumlx, suml2 = sums(codes)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(take, codes + fnmax, L)
        scale = np.where(take, sumlx / suml2, scale)
        best = np.where(take, scale * sumlx, best)
    return np.where(zero, F32(0), L), np.where(zero, F32(0), scale)


def _fit_q3(x: np.ndarray, nmax: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=True) over columns: codes in [0, 2 nmax) and the signed scale.

    Coordinate descent replayed element by element (each change depends on the sums the previous one left); a
    sub-block whose sweep changed nothing would change nothing again, so running all 5 sweeps for every column
    gives the C loop's early exit."""
    mx, amax = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    L = np.clip(np.rint((-F32(nmax) / mx) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum(w * L * L)
    for _ in range(5):
        for i in range(x.shape[0]):
            wi, xi, li, wxi = w[i], x[i], L[i], wx[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = np.clip(np.rint(xi * sl2 / slx), -nmax, nmax - 1)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), L + F32(nmax)), np.where(zero, F32(0), scale)


# ---- packing helpers ------------------------------------------------------------------------------------------

def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nb, 256) codes 0..3 -> (nb, 64): byte l of each 128-half holds values l, l+32, l+64, l+96."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> 12 bytes (get_scale_min_k4's layout)."""
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _u8_wrap(v: np.ndarray) -> np.ndarray:
    """C's int -> uint8_t conversion (modulo 256), for a float array of integers."""
    return (v.astype(np.int64) & 0xFF).astype(np.uint8)


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _requant(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Codes against the decoded sub-block scales: rint((x + dm)/d) clipped; a zero scale keeps the fit's codes."""
    with np.errstate(divide="ignore", invalid="ignore"):
        num = x if dm is None else x + dm[..., None]
        q = np.clip(np.rint(num / d[..., None]), lo, hi)
    return np.where((d == 0)[..., None], L, q)


# ---- the five formats -----------------------------------------------------------------------------------------

def _q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = _columns(x, 16)
    L, scales, mins = _fit_with_min(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    L, scales, mins = _rows(L, 16).reshape(nb, 16, 16), scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    has_s, has_m = max_scale > 0, max_min > 0
    ls = np.where(has_s[:, None], np.rint((F32(15) / max_scale)[:, None] * scales), F32(0))
    lm = np.where(has_m[:, None], np.rint((F32(15) / max_min)[:, None] * mins), F32(0))
    sc = _u8_wrap(ls) | (_u8_wrap(lm) << 4)  # C: scales[j] = l; scales[j] |= l << 4 (uint8 store)
    d = _fp16(np.where(has_s, max_scale / F32(15), F32(0)))
    dmin = _fp16(np.where(has_m, max_min / F32(15), F32(0)))
    dd = d.astype(F32)[:, None] * (sc & 0xF).astype(F32)
    dmm = dmin.astype(F32)[:, None] * (sc >> 4).astype(F32)
    L = _requant(x.reshape(nb, 16, 16), L, dd, dmm, 0, 3).reshape(nb, 256)
    return np.concatenate([sc, _pack_2bit(L), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    L, scales = _fit_q3(_columns(x, 16))
    L, scales = _rows(L, 16).reshape(nb, 16, 16), scales.reshape(nb, 16)
    max_scale, _ = _signed_max(scales, axis=1)
    nz = max_scale != 0
    with np.errstate(divide="ignore"):
        iscale = F32(-32) / max_scale
    l6 = np.where(nz[:, None], np.clip(np.rint(iscale[:, None] * scales), -32, 31) + F32(32), F32(0))
    l6 = l6.astype(np.uint8)
    sc = np.empty((nb, 12), np.uint8)
    sc[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = (l6 >> 4).reshape(nb, 4, 4)  # [group j//4, j%4]
    sc[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d = _fp16(np.where(nz, F32(1) / iscale, F32(0)))
    dd = d.astype(F32)[:, None] * (l6.astype(F32) - F32(32))
    L = _requant(x.reshape(nb, 16, 16), L, dd, None, -4, 3)
    L = np.where((dd == 0)[..., None], L, L + F32(4)).reshape(nb, 256)
    high = (L > 3).reshape(nb, 8, 32).astype(np.uint8)  # value j: hmask byte j % 32, bit j // 32
    hmask = np.zeros((nb, 32), np.uint8)
    for bit in range(8):
        hmask |= high[:, bit] << bit
    L = np.where(L > 3, L - F32(4), L)
    return np.concatenate([hmask, _pack_2bit(L), sc, _f16_bytes(d)], axis=1)


def _q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K share everything but the code width: returns the codes (nb, 256) and the 16 header bytes."""
    nb = x.shape[0]
    xs = _columns(x, 32)
    av_x = np.sqrt(_seqsum(xs * xs) / F32(32))
    L, scales, mins = _fit_with_min(xs, av_x + np.abs(xs), nmax, rmin, 0.1, nstep, False)
    L, scales, mins = _rows(L, 8).reshape(nb, 8, 32), scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_u8_wrap(np.rint(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_u8_wrap(np.rint(inv_min[:, None] * mins)), 63)
    d, dmin = _fp16(max_scale / F32(63)), _fp16(max_min / F32(63))
    dd = d.astype(F32)[:, None] * ls.astype(F32)
    dmm = dmin.astype(F32)[:, None] * lm.astype(F32)
    L = _requant(x.reshape(nb, 8, 32), L, dd, dmm, 0, nmax).reshape(nb, 256)
    head = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(ls, lm)], axis=1)
    return L, head


def _q4_k(x: np.ndarray) -> np.ndarray:
    L, head = _q45_k(x, 15, -1.0, 20)
    q = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    return np.concatenate([head, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    L, head = _q45_k(x, 31, -0.5, 15)
    q = L.astype(np.uint8).reshape(-1, 4, 2, 32)  # [64-chunk c, first/second 32, l]
    low, high = q & 0xF, q >> 4
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for c in range(4):  # bit 2c: value 64c + l, bit 2c+1: value 64c + 32 + l
        qh |= (high[:, c, 0] << (2 * c)) | (high[:, c, 1] << (2 * c + 1))
    return np.concatenate([head, qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    L, scales = _fit_symmetric(_columns(x, 16), 32)
    L, scales = _rows(L, 16).reshape(nb, 16, 16), scales.reshape(nb, 16)
    max_scale, max_abs = _signed_max(scales, axis=1)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore"):
        iscale = F32(-128) / max_scale
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127)
    sc = np.where(zero[:, None], F32(0), sc)
    d = _fp16(np.where(zero, F32(0), F32(1) / iscale))
    dd = d.astype(F32)[:, None] * sc
    L = _requant(x.reshape(nb, 16, 16), L, dd, None, -32, 31)
    L = np.where((dd == 0)[..., None], L, L + F32(32))
    L = np.where(zero[:, None, None], F32(0), L).astype(np.uint8).reshape(nb, 2, 4, 32)  # [half, quarter, l]
    low, high = L & 0xF, L >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)


_QUANTISERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(data: np.ndarray, qtype: str, threads: int | None = None) -> np.ndarray:
    """Quantise `data` (..., ncols) to the K-quant `qtype` ("Q4_K", ...): uint8 of shape (..., ncols/256 * bytes).

    ncols must be a multiple of 256 (llama.cpp falls back to another type otherwise; see gguf_writer)."""
    if qtype not in _QUANTISERS:
        raise ValueError(f"unknown K-quant {qtype!r}; choose one of {', '.join(_QUANTISERS)}")
    data = np.asarray(data, dtype=F32)
    if data.shape[-1] % QK_K:
        raise ValueError(f"{qtype} needs rows whose length is a multiple of {QK_K}, got {data.shape[-1]}: "
                         "use a 32-block type (q8_0, q5_0, ...) for this tensor")
    if not np.isfinite(data).all():
        raise ValueError(f"cannot quantise to {qtype}: the tensor holds NaN or infinite values")
    blocks = data.reshape(-1, QK_K)
    fn = _QUANTISERS[qtype]
    chunks = [blocks[i:i + _CHUNK_BLOCKS] for i in range(0, blocks.shape[0], _CHUNK_BLOCKS)]
    threads = threads or min(len(chunks), os.cpu_count() or 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if threads <= 1 or len(chunks) <= 1:
            parts = [fn(c) for c in chunks]
        else:
            with ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(fn, chunks))
    out = np.concatenate(parts, axis=0) if parts else np.zeros((0, BLOCK_BYTES[qtype]), np.uint8)
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * BLOCK_BYTES[qtype])


# ---- dequantisation (llama.cpp's dequantize_row_qN_K, same float32 products) -----------------------------------

def _scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ls = np.concatenate([sc[:, 0:4] & 63, (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=1)
    return ls.astype(F32), lm.astype(F32)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(F32)  # (nb, 1)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, 256)


def dequantize(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """K-quant bytes (..., n*bytes) -> float32 (..., n*256)."""
    nbytes = BLOCK_BYTES[qtype]
    b = np.asarray(blocks, dtype=np.uint8)
    lead = b.shape[:-1]
    b = b.reshape(-1, nbytes)
    nb = b.shape[0]
    if qtype == "Q2_K":
        sc, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        q = _unpack_2bit(b[:, 16:80]).reshape(nb, 16, 16).astype(F32)
        y = (d * (sc & 0xF).astype(F32))[..., None] * q - (dmin * (sc >> 4).astype(F32))[..., None]
    elif qtype == "Q3_K":
        hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
        low = np.concatenate([sc[:, 0:8] & 0xF, sc[:, 0:8] >> 4], axis=1)
        hi = (sc[:, 8:12][:, None, :] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3  # [j//4, j%4]
        s = (low | (hi.reshape(nb, 16) << 4)).astype(F32) - F32(32)
        h = ((hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(nb, 256)
        q = _unpack_2bit(qs).astype(F32) - F32(4) * (1 - h).astype(F32)
        y = (d * s)[..., None] * q.reshape(nb, 16, 16)
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        ls, lm = _scale_min_k4(b[:, 4:16])
        qs = b[:, 16:144] if qtype == "Q4_K" else b[:, 48:176]
        q = (qs.reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF
        if qtype == "Q5_K":
            qh = b[:, 16:48]
            bits = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # bit 2c + half
            q = q | (bits.reshape(nb, 4, 2, 32) << 4)
        y = (d * ls)[..., None] * q.reshape(nb, 8, 32).astype(F32) - (dmin * lm)[..., None]
    elif qtype == "Q6_K":
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
        low = (ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF  # [h, ql>>4?, 64]
        low = low.reshape(nb, 2, 4, 32)  # quarters 0,1 (low nibbles), 2,3 (high nibbles)
        high = (qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        q = (low | (high << 4)).astype(F32) - F32(32)
        y = (d * sc.astype(F32))[..., None] * q.reshape(nb, 16, 16)
    else:
        raise ValueError(f"unknown K-quant {qtype!r}")
    return y.reshape(*lead, -1).astype(F32)
