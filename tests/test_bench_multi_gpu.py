"""bench/multi_gpu.py end to end on CPU (issue 9): the driver launches itself under torchrun once per process count,
2 gloo ranks train the tiny shape with DDP (scaling mode) and with FSDP2 from the meta device (fsdp mode), and the
merged JSON has one complete row per launch."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "multi_gpu.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
ROW_FIELDS = {"world_size", "tokens_per_s", "tokens_per_s_per_gpu", "scaling_efficiency", "step_s", "step_s_ranks",
              "peak_gib", "peak_gib_ranks", "peak_rss_gib", "first_loss", "last_loss", "losses", "setup", "seq",
              "batch_per_device", "global_batch", "adapters_updated"}


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "multi_gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert out.with_suffix(".md").exists()
    result = json.loads(out.read_text())
    assert result["env"]["NCCL_NVLS_ENABLE"] == "0" and result["env"]["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert {"date", "versions", "command", "rows"} <= result.keys()
    for row in result["rows"]:
        assert "error" not in row, row.get("traceback") or row.get("output_tail")
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert all(math.isfinite(x) for x in row["losses"]) and row["finite"]
        assert row["adapters_updated"]  # the adapters really got gradients
        assert row["seq"] == 64 and len(row["step_s_ranks"]) == row["world_size"]
        tokens = row["world_size"] * row["batch_per_device"] * row["seq"]
        assert row["tokens_per_s"] == pytest.approx(tokens / row["step_s"])
        assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / row["world_size"])
        assert row["step_s"] == max(row["step_s_ranks"])
    return result


def test_scaling_ddp_one_and_two_ranks(tmp_path):
    result = _run(tmp_path, "scaling", "--gpus", "1,2", "--steps", "2", "--warmup", "1")
    rows = result["rows"]
    assert [r["world_size"] for r in rows] == [1, 2]
    assert [r["parallel"] for r in rows] == ["single process", "ddp"]
    base = rows[0]["tokens_per_s"]
    for r in rows:
        assert r["scaling_efficiency"] == pytest.approx(r["tokens_per_s_per_gpu"] / base)
        assert len(r["losses"]) == 3 and r["global_batch"] == 2 * r["world_size"]
    assert rows[0]["scaling_efficiency"] == pytest.approx(1.0)
    assert rows[1]["losses"] != rows[0]["losses"]  # the mean over 2 ranks includes rank 1's own batch


@pytest.mark.parametrize("qlora,policy", [(False, "checkpoint"), (True, "none")])
def test_fsdp_two_ranks_from_meta(tmp_path, qlora, policy):
    result = _run(tmp_path, "fsdp", "--gpus", "2", "--steps", "2", "--policy", policy,
                  *(["--qlora"] if qlora else []))
    (row,) = result["rows"]
    assert row["world_size"] == 2 and row["parallel"] == "fsdp2" and row["sharded"]
    # checkpointed FSDP2 layers still train their adapters (_run asserts adapters_updated for every row)
    assert row["setup"] == f"2 {policy}"
    # each rank holds half of every parameter (tiny shapes: rows split evenly), never the whole model
    assert row["local_param_gib_max"] == pytest.approx(row["full_param_gib"] / 2, rel=0.05)
    assert len(row["losses"]) == 3
    if qlora:
        assert row["nf4_layers"] == 14 and row["replicated_buffer_gib"] > 0
        assert "replicated on every rank" in row["note"] and "replicated on every rank" in result["note"]
    else:
        assert row["nf4_layers"] == 0 and row["replicated_buffer_gib"] == 0
