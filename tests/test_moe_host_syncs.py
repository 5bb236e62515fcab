"""The MoE layer's routing path has static shapes and never reads a device value on the host (issue 17: a host sync
per layer stalls the GPU queue of every training step).

Checked on the CPU with fake tensors (torch's FakeTensorMode: shapes and dtypes, no data): any op whose output shape
depends on the data (nonzero, unique, boolean-mask indexing, repeat_interleave with tensor repeats) or that reads a
value to the host (.item(), .tolist(), int(t), bool(t)) raises there. The experts' grouped GEMM is stood in for by a
static-shape module (its Triton kernels need real memory; its own no-sync GPU test is in test_kernels_grouped_gemm.py,
and tests/test_moe_gpu.py checks the whole layer with torch.cuda.set_sync_debug_mode("error")).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

transformers = pytest.importorskip("transformers")

from fasttune.kernels import grouped_gemm as gg
from fasttune.models.moe import SparseMoE, load_balancing_loss
from fasttune.models.spec import ArchSpec


class _StaticExperts(nn.Module):
    """Stands in for the experts: a static-shape function of the sorted rows and of the offsets."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.proj(x_sorted) * offsets[-1].to(x_sorted.dtype)


def _spec(family: str) -> ArchSpec:
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                         num_experts_per_tok=2)
    else:
        cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        num_local_experts=4, num_experts_per_tok=2)
    return ArchSpec.from_hf_config(cfg.to_dict())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("masked", [False, True])
def test_routing_forward_backward_and_aux_loss_have_static_shapes(family, masked):
    spec = _spec(family)
    B, T = 2, 5
    with FakeTensorMode():
        moe = SparseMoE(spec)
        moe.experts = _StaticExperts(spec.hidden_size)
        moe.train()
        x = torch.randn(B, T, spec.hidden_size, requires_grad=True)
        logits = []
        y = moe(x, logits)
        assert y.shape == x.shape
        mask = torch.ones(B, T, dtype=torch.long) if masked else None
        aux = load_balancing_loss(logits, spec.num_experts, spec.experts_per_token, mask)
        (y.square().mean() + aux).backward()
        assert x.grad.shape == x.shape and moe.router_linear.weight.grad is not None


def test_fake_tensors_catch_a_host_read_and_a_data_dependent_shape():
    """The detector works: the per-expert reference (which reads the offsets to the host), nonzero, boolean-mask
    indexing and repeat_interleave with tensor repeats all raise under fake tensors."""
    with FakeTensorMode():
        ids = torch.randint(0, 4, (6, 2))
        order, offsets, inverse = gg.sort_by_expert(ids, 4)
        x = torch.randn(12, 8)
        with pytest.raises(DataDependentOutputException):
            gg.grouped_linear_reference(x, torch.randn(4, 8, 8), offsets)
        with pytest.raises(DynamicOutputShapeException):
            torch.nonzero(ids)
        with pytest.raises(DynamicOutputShapeException):
            x[x[:, 0] > 0]
        with pytest.raises(DynamicOutputShapeException):
            x.repeat_interleave(torch.full((12,), 2), dim=0)
