"""What a run shows and leaves behind: a tqdm progress bar (loss, lr, tokens/s, GPU memory; tqdm adds the ETA),
metrics as JSON Lines, TensorBoard scalars when `tensorboard` is installed, and a loss-curve PNG at the end."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def gpu_memory_gib() -> float | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


class MetricsLog:
    """Appends one JSON object per line to `path`; on resume, lines past the resumed step are dropped first, so
    the file reads like one uninterrupted run."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True,
                 enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line, row in _rows(self.path) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of a metrics file; a last line cut off by a killed process is left out."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line can be half-written; anything else is a real error
                raise
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [row for _, row in _rows(path)]


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "fasttune") -> Path | None:
    """Training loss per step (and eval loss where logged) as a PNG, drawn by matplotlib when installed, else by
    `plain_loss_png` (no dependency: curves, axes and the numeric range, no title); None with nothing logged."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and math.isfinite(r["eval_loss"])]
    if not train and not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return plain_loss_png(train, evals, png_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


# 3x5 pixel digits for the plain plot's axis numbers (rows top to bottom, 3 bits each)
_GLYPHS = {"0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
           "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
           "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "e": (0, 7, 7, 4, 7)}


def plain_loss_png(train: list[tuple[int, float]], evals: list[tuple[int, float]], png_path: str | os.PathLike,
                   width: int = 640, height: int = 360) -> Path:
    """The loss curve without matplotlib: train loss as a blue line, eval loss as orange dots, axes with the step
    and loss ranges written at their ends. Encoded as an RGB PNG with zlib."""
    import struct
    import zlib

    px = bytearray(b"\xff" * (width * height * 3))
    left, right, top, bottom = 70, width - 20, 20, height - 40
    points = train + evals
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            px[i:i + 3] = bytes(rgb)

    def to_px(step: float, loss: float) -> tuple[int, int]:
        return (round(left + (step - x0) / (x1 - x0) * (right - left)),
                round(bottom - (loss - y0) / (y1 - y0) * (bottom - top)))

    def line(a: tuple[int, int], b: tuple[int, int], rgb, thick: int = 1) -> None:
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for k in range(n + 1):
            x, y = a[0] + (b[0] - a[0]) * k / n, a[1] + (b[1] - a[1]) * k / n
            for dx in range(thick):
                for dy in range(thick):
                    put(round(x) + dx, round(y) + dy, rgb)

    def text(x: int, y: int, s: str, scale: int = 2) -> None:
        for ch in s:
            for r, bits in enumerate(_GLYPHS.get(ch, (0,) * 5)):
                for c in range(3):
                    if bits >> (2 - c) & 1:
                        for dx in range(scale):
                            for dy in range(scale):
                                put(x + c * scale + dx, y + r * scale + dy, (60, 60, 60))
            x += 4 * scale

    grey = (150, 150, 150)
    line((left, top), (left, bottom), grey)
    line((left, bottom), (right, bottom), grey)
    text(4, top, f"{y1:.3g}")
    text(4, bottom - 10, f"{y0:.3g}")
    text(left, bottom + 10, str(int(x0)))
    text(right - 8 * len(str(int(x1))), bottom + 10, str(int(x1)))
    for a, b in zip(train, train[1:]):
        line(to_px(*a), to_px(*b), (31, 119, 180), thick=2)
    if len(train) == 1:
        line(to_px(*train[0]), to_px(*train[0]), (31, 119, 180), thick=3)
    for p in evals:
        cx, cy = to_px(*p)
        line((cx - 2, cy - 2), (cx - 2, cy - 2), (255, 127, 14), thick=5)

    raw = b"".join(b"\x00" + bytes(px[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    png_path = Path(png_path)
    png_path.write_bytes(png)
    return png_path


class Progress:
    """tqdm bar over optimizer steps. With the bar off (train.progress: false, `demo --no-progress`) one plain line
    per `every`-th step instead (logs, CI, pipes); non-zero ranks print nothing either way."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int = 1):
        self.bar = None
        self.total, self.step, self.every = total, initial, max(1, every)
        self.plain = not enabled and _rank() == 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")

    def update(self, loss: float, lr: float, tokens_per_s: float) -> None:
        self.step += 1
        post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
        mem = gpu_memory_gib()
        if mem is not None:
            post["mem"] = f"{mem:.1f}GiB"
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.plain and (self.step % self.every == 0 or self.step == self.total):
            print(f"step {self.step}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in post.items()), flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
