"""AdamW with 8-bit optimizer state (blockwise dynamic quantisation, as bitsandbytes' 8-bit optimizers).

Update (decoupled weight decay, bias-corrected, exactly torch.optim.AdamW's formula):
    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
m and v are stored as uint8 codes per value plus one float32 absmax per block of 256 values: the code is the
nearest entry of a dynamic (floating-point-like) map of 256 values in [-1, 1] (signed, for m) or [0, 1]
(unsigned, for v) to value / absmax. The dynamic map's exponent bits keep small values relatively precise, which
is what makes 8-bit Adam track 32-bit Adam (Dettmers et al., 2022). Each step dequantises a tensor's state to
float32, updates it and requantises it: 2 bytes of state per parameter instead of 8. Tensors smaller than
`min_8bit_size` keep float32 state (as bitsandbytes does), where quantisation would save nothing.
"""
from __future__ import annotations

import torch

from ..kernels.dynamic_map import create_dynamic_map

BLOCK = 256
_MAPS: dict = {}


def _code(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, device)
    if key not in _MAPS:
        code = create_dynamic_map(signed=signed).to(device)  # sorted; unsigned: 256 values in [0, 1]
        _MAPS[key] = (code, (code[1:] + code[:-1]) / 2)
    return _MAPS[key]


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes (x.numel(),) and float32 absmax per block of BLOCK values."""
    code, midpoints = _code(signed, x.device)
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1)
    normed = (blocks / absmax.clamp(min=1e-30)[:, None]).clamp_(-1, 1)
    q = torch.bucketize(normed, midpoints).to(torch.uint8)
    return q.view(-1)[: flat.numel()], absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, signed: bool, shape) -> torch.Tensor:
    code, _ = _code(signed, q.device)
    n = q.numel()
    values = code[q.long()]
    pad = (-n) % BLOCK
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, BLOCK) * absmax[:, None]
    return values.view(-1)[:n].view(shape)


class AdamW8bit(torch.optim.Optimizer):
    """Drop-in torch.optim.AdamW with 8-bit blockwise-quantised moments (plain PyTorch, any device)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 min_8bit_size: int = 4096):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid AdamW8bit hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      min_8bit_size=min_8bit_size))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                g = p.grad.float()
                state = self.state[p]
                quantized = p.numel() >= group["min_8bit_size"]
                if not state:
                    state["step"] = 0
                    state["quantized"] = quantized
                    if quantized:
                        zeros = torch.zeros_like(g)
                        state["m_q"], state["m_absmax"] = quantize_blockwise(zeros, True)
                        state["v_q"], state["v_absmax"] = quantize_blockwise(zeros, False)
                    else:
                        state["m"] = torch.zeros_like(g)
                        state["v"] = torch.zeros_like(g)
                state["step"] += 1
                t = state["step"]
                if state["quantized"]:
                    m = dequantize_blockwise(state["m_q"], state["m_absmax"], True, g.shape)
                    v = dequantize_blockwise(state["v_q"], state["v_absmax"], False, g.shape)
                else:
                    m, v = state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if state["quantized"]:
                    state["m_q"], state["m_absmax"] = quantize_blockwise(m, True)
                    state["v_q"], state["v_absmax"] = quantize_blockwise(v, False)
                bias1 = 1 - b1 ** t
                bias2 = 1 - b2 ** t
                update = (m / bias1) / ((v / bias2).sqrt_().add_(eps))
                if wd:
                    p.mul_(1 - lr * wd)
                if p.dtype == torch.float32:
                    p.add_(update, alpha=-lr)
                else:  # 16-bit parameters: update in float32, round once
                    p.copy_(p.float().add_(update, alpha=-lr))
        return loss


def tensor_state_bytes(numel: int, min_8bit_size: int = 4096) -> int:
    """Bytes of state `AdamW8bit.step` keeps for one parameter of `numel` values (memory planning before the
    first step): m and v as uint8 codes plus a float32 absmax per block of BLOCK values, or float32 m and v below
    `min_8bit_size`."""
    if numel >= min_8bit_size:
        return 2 * (numel + 4 * -(-numel // BLOCK))
    return 2 * 4 * numel


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (for memory reports and tests)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


__all__ = ["AdamW8bit", "dequantize_blockwise", "quantize_blockwise", "state_bytes", "tensor_state_bytes"]
