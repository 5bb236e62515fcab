"""Weights: non-finite values, all-zero tensors, dtypes that differ from the config's. One tensor in memory at
a time, scanned in chunks so even a 128k x 8k embedding needs only a few extra MB."""
from __future__ import annotations

from typing import Iterator

import torch

from ..context import ModelFolder
from ..report import Finding

_CHUNK = 1 << 22  # elements per scan step


def _scan(t: torch.Tensor) -> tuple[int, int, bool]:
    """(NaN count, inf count, all zero) of a floating tensor."""
    flat = t.reshape(-1)
    nan = inf = 0
    all_zero = True
    for start in range(0, flat.numel(), _CHUNK):
        c = flat[start:start + _CHUNK]
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
        if all_zero and bool(c.any()):
            all_zero = False
    return nan, inf, all_zero


def _zero_is_legitimate(name: str, folder: ModelFolder) -> bool:
    """Biases start at zero (gpt-oss's expert stacks: `*_bias`), and Gemma's norms are stored as w with (1 + w)
    applied, so w = 0 is the identity."""
    if name.endswith((".bias", "_bias")):
        return True
    spec = folder.spec
    unit_offset = spec.norm_unit_offset if spec is not None else folder.config.get("model_type", "").startswith("gemma")
    return unit_offset and "norm" in name.rsplit(".", 2)[-2]


def check_weights(folder: ModelFolder) -> Iterator[Finding]:
    if not folder.weight_files:
        pickles = sorted(folder.path.glob("pytorch_model*.bin"))
        yield Finding("weights-missing", "error" if not pickles else "warning",
                      "no safetensors weights in the folder",
                      [f"pickle checkpoints found: {', '.join(p.name for p in pickles[:3])}" if pickles else
                       "no model.safetensors, shards or index"],
                      "convert the checkpoint to safetensors (pickle files can run code when loaded)")
        return
    nonfinite: list[str] = []
    zero: list[str] = []
    for name, t in folder.iter_tensors():
        if not t.is_floating_point():
            continue
        nan, inf, all_zero = _scan(t)
        if nan or inf:
            nonfinite.append(f"{name}: {nan} NaN, {inf} inf of {t.numel()} values")
        if all_zero and not _zero_is_legitimate(name, folder):
            zero.append(f"{name}: shape {tuple(t.shape)}")
        del t
    if nonfinite:
        yield Finding("weights-nonfinite", "error", f"{len(nonfinite)} tensor(s) hold NaN or inf",
                      nonfinite[:10] + ([f"... and {len(nonfinite) - 10} more"] if len(nonfinite) > 10 else []),
                      "re-download or re-export the checkpoint: a non-finite weight makes every output NaN; "
                      "if it appeared after training, lower the learning rate or check for fp16 overflow")
    if zero:
        yield Finding("weights-zero", "error", f"{len(zero)} tensor(s) are entirely zero",
                      zero[:10] + ([f"... and {len(zero) - 10} more"] if len(zero) > 10 else []),
                      "a zero weight matrix silences its layer: the export or a merge probably failed; re-export")


# the float32 scale tables bitsandbytes stores beside each 4-bit weight (float32 by design, whatever torch_dtype says)
_QUANT_STATE = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.", ".SCB")


def check_dtypes(folder: ModelFolder) -> Iterator[Finding]:
    want = folder.config.get("torch_dtype") or folder.config.get("dtype")
    floats = {n: i.dtype for n, i in folder.tensors.items() if i.dtype.startswith(("float", "bfloat"))
              and not (folder.config.get("quantization_config") and any(q in n for q in _QUANT_STATE))}
    if not floats:
        return
    found = sorted(set(floats.values()))
    if want is None:
        yield Finding("weights-dtype", "info", "config.json names no torch_dtype",
                      [f"weights are stored as {', '.join(found)}"],
                      "loaders fall back to float32; pass a dtype explicitly")
        return
    other = {n: d for n, d in floats.items() if d != want}
    if other:
        kinds = sorted(set(other.values()))
        sample = [f"{n}: {d}" for n, d in list(other.items())[:5]]
        yield Finding("weights-dtype", "warning",
                      f"{len(other)} of {len(floats)} tensors are {'/'.join(kinds)}, config says {want}",
                      sample + ([f"... and {len(other) - 5} more"] if len(other) > 5 else []),
                      f"re-save the weights as {want} (or correct torch_dtype): loaders take the config's dtype at "
                      "face value and a fp32 -> bf16 cast on load changes the numbers the model was validated with",
                      repair={"resave": True})


CHECKS = [("weights", check_weights), ("weights-dtype", check_dtypes)]
