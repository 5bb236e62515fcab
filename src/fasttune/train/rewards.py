"""Reward functions for online RL (objective.type grpo): the built-ins, and loading the user's own.

A reward function takes (prompt, completion, row) — the prompt as the model saw it (rendered through the chat
template with objective.grpo.prompt_format chat), the completion as decoded text (special tokens dropped), the
dataset row the prompt came from (a dict: its own columns, e.g. the reference answer) — and returns a float. The config names them in `objective.grpo.rewards`:

    exact_answer   1.0 when the answer the completion gives (after its last `####`, or inside its last `\\boxed{}`)
                   equals the row's answer column (itself read after a `####` when it has one, as GSM8K's do);
                   numbers compare as numbers (1,000 == 1000.0), other text after trimming; else 0.0
    format         1.0 when `format_regex` matches the completion (re.search, DOTALL), else 0.0
    length         with n the completion's length in characters and T = `length_target`: -|n - T| / T (mode
                   target: 0 at T, lower either side) or -max(0, n - T) / T (mode penalty: only longer is worse)
    "path/to/file.py:function" or "package.module:function"
                   the user's function. A relative file path is resolved against the config file's folder first,
                   then the working directory. This runs the user's Python code in the training process, as the
                   config asks: name only files you trust.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RewardFn = Callable[[str, str, dict], float]
BUILTINS = ("exact_answer", "format", "length")

_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class RewardError(ValueError):
    pass


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None without one."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
        j += 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a text gives: the line after its last `####`, else the last \\boxed{} content; None."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    return _boxed(text)


def _normalise(answer: str) -> str | float:
    a = answer.strip().strip("$").strip().rstrip(".")
    if _NUMBER.match(a.replace(" ", "")):
        try:
            return float(a.replace(",", "").replace(" ", ""))
        except ValueError:
            pass
    return " ".join(a.split())


def answers_equal(given: str | None, expected: str | None) -> bool:
    if given is None or expected is None:
        return False
    a, b = _normalise(given), _normalise(expected)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def exact_answer_reward(answer_column: str) -> RewardFn:
    def exact_answer(prompt: str, completion: str, row: dict) -> float:
        if answer_column not in row:
            raise RewardError(f"reward exact_answer reads the column {answer_column!r}, which this row does not have "
                              f"(columns: {sorted(row)}); set objective.grpo.answer_column")
        expected = str(row[answer_column])
        expected = extract_answer(expected) if ("####" in expected or "\\boxed" in expected) else expected
        return 1.0 if answers_equal(extract_answer(completion), expected) else 0.0
    return exact_answer


def format_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern, re.DOTALL)

    def format(prompt: str, completion: str, row: dict) -> float:  # noqa: A001 - the reward's name in configs
        return 1.0 if compiled.search(completion) else 0.0
    return format


def length_reward(target: int, mode: str) -> RewardFn:
    """target: -|n - target| / target; penalty: -max(0, n - target) / target, n the completion's characters."""
    def length(prompt: str, completion: str, row: dict) -> float:
        n = len(completion)
        over = n - target if mode == "penalty" else abs(n - target)
        return -max(0, over) / target
    return length


def _load_user_function(spec: str, base_dir: Path | None) -> RewardFn:
    module_part, _, name = spec.rpartition(":")
    if not module_part or not name:
        raise RewardError(f"reward {spec!r}: expected one of {', '.join(BUILTINS)} or 'module:function' "
                          "(a file.py:function or an importable package.module:function)")
    if module_part.endswith(".py") or "/" in module_part:
        candidates = [Path(module_part)] if Path(module_part).is_absolute() else \
            [p / module_part for p in ([base_dir] if base_dir else []) + [Path.cwd()]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise RewardError(f"reward {spec!r}: no file {module_part} (looked in "
                              f"{', '.join(str(c.parent) for c in candidates)})")
        mod_name = f"fasttune_user_reward_{zlib.crc32(str(path.resolve()).encode()):08x}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            try:
                loader_spec.loader.exec_module(module)  # the user's code, as the config asks
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise RewardError(f"reward {spec!r}: cannot import {module_part} ({e}); give a file path "
                              "(rewards.py:function, relative to the config file) or install the module") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {module_part} has no function {name!r}")
    return fn


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float


def resolve_spec(spec: str, base_dir: Path) -> str:
    """A user reward's relative file path made absolute against the config file's folder, when the file is there
    (so a run's recorded config.yaml works from any directory); other specs unchanged."""
    module_part, sep, name = spec.rpartition(":")
    if sep and (module_part.endswith(".py") or "/" in module_part) and not Path(module_part).is_absolute():
        if (base_dir / module_part).is_file():
            return f"{(base_dir / module_part).resolve()}:{name}"
    return spec


def build_rewards(specs: list[str], weights: list[float] | None, *, answer_column: str, format_regex: str | None,
                  length_target: int | None, length_mode: str, base_dir: Path | None = None) -> list[Reward]:
    if not specs:
        raise RewardError("objective.grpo.rewards is empty: name at least one reward (exact_answer, format, length, "
                          "or file.py:function)")
    if weights is not None and len(weights) != len(specs):
        raise RewardError(f"objective.grpo.reward_weights has {len(weights)} entries for {len(specs)} rewards")
    out = []
    for i, spec in enumerate(specs):
        if spec == "exact_answer":
            fn = exact_answer_reward(answer_column)
        elif spec == "format":
            if not format_regex:
                raise RewardError("reward format needs objective.grpo.format_regex (e.g. '<think>.*</think>')")
            fn = format_reward(format_regex)
        elif spec == "length":
            if not length_target:
                raise RewardError("reward length needs objective.grpo.length_target (characters, >= 1)")
            fn = length_reward(length_target, length_mode)
        else:
            fn = _load_user_function(spec, base_dir)
        name = spec if spec in BUILTINS else spec.rpartition(":")[2]
        out.append(Reward(name, fn, 1.0 if weights is None else float(weights[i])))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise RewardError(f"two rewards share a name in {names}: metrics are keyed by it; rename a function")
    return out


def score(rewards: list[Reward], prompt: str, completion: str, row: dict) -> list[float]:
    """Each reward's value for one completion; a non-number or non-finite value is an error naming the reward."""
    out = []
    for r in rewards:
        v = r.fn(prompt, completion, row)
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward {r.name} returned {type(v).__name__} {v!r:.60}; a reward returns a number") \
                from None
        if not math.isfinite(v):
            raise RewardError(f"reward {r.name} returned {v} for a completion; rewards must be finite")
        out.append(v)
    return out
