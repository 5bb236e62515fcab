"""Command-line entry points for `fasttune doctor` and `fasttune compare` (wired into fasttune.cli):

    add_doctor_arguments(parser); run_doctor(args) -> exit code
    add_compare_arguments(parser); run_compare(args) -> exit code
"""
from __future__ import annotations

from pathlib import Path

from . import diagnose, repair
from .compare_cli import add_compare_arguments, run_compare


def add_doctor_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model folder (config.json, safetensors, "
                                                               "tokenizer), a GGUF file, or a Hub repo id (org/name: "
                                                               "the Hugging Face cache, else a download)")
    parser.add_argument("--data", default=None, help="dataset file to check for untrained tokens (jsonl, json, csv, "
                                                     "parquet, xlsx, txt)")
    parser.add_argument("--data-rows", type=int, default=1000, help="rows of --data to tokenize (default 1000)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32", "fp16", "bf16", "fp32"], default=None,
                        help="the dtype you mean to train in (checks families that overflow float16)")
    parser.add_argument("--fix", metavar="OUT_DIR", default=None, help="write a repaired copy of the model here")
    parser.add_argument("--json", default=None, help="also write the findings as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="hide informational notes")


def run_doctor(args) -> int:
    """Exit code: 1 when an error remains (after --fix: in the repaired copy), else 0."""
    try:
        report = diagnose(args.model_dir, data=args.data, max_data_rows=args.data_rows, dtype=args.dtype)
    except FileNotFoundError as e:
        print(f"fasttune doctor: {e}")
        return 2
    print(report.format(show_info=not args.quiet))
    if args.json:
        Path(args.json).write_text(report.to_json())
    if not args.fix:
        return 1 if report.has_errors else 0
    if not any(f.repair for f in report.findings):
        print(f"\nnothing --fix can repair automatically; {args.fix} not written")
        return 1 if report.has_errors else 0
    print(f"\nrepairing into {args.fix}:")
    for line in repair(report, args.fix):
        print(f"  {line}")
    after = diagnose(args.fix, data=args.data, max_data_rows=args.data_rows, dtype=args.dtype)
    left = after.problems()
    print(f"\nafter repair: {len(left)} problem(s) left" + ("" if not left else ":"))
    for f in left:
        print(f"  [{f.severity.upper()}] {f.check}: {f.title}")
    return 1 if after.has_errors else 0


__all__ = ["add_compare_arguments", "add_doctor_arguments", "run_compare", "run_doctor"]
