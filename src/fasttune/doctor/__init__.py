"""The model doctor: find what is broken in a model folder, its tokenizer or a dataset before training on it,
and write a repaired copy. `fasttune doctor MODEL_DIR [--data FILE] [--fix OUT_DIR]`.

    from fasttune.doctor import diagnose, repair
    report = diagnose("path/to/model", data="train.jsonl")
    print(report.format())
"""
from __future__ import annotations

import os

from .checks import ALL_CHECKS
from .context import ModelFolder
from .fix import repair as _repair
from .report import Finding, Report


def diagnose(model_dir: str | os.PathLike, data: str | os.PathLike | None = None, max_data_rows: int = 1000,
             checks: list[str] | None = None, dtype: str | None = None) -> Report:
    """Run every check (or those named in `checks`) on `model_dir`; never raises for a broken model. `dtype`: the
    dtype it is meant to be trained in (float16 / bfloat16 / float32), for the checks that depend on it."""
    folder = ModelFolder(model_dir, data=data, max_data_rows=max_data_rows, dtype=dtype)
    report = Report(str(model_dir), folder=folder)
    for name, check in ALL_CHECKS:
        if checks is not None and name not in checks:
            continue
        report.checks_run.append(name)
        try:
            for finding in check(folder):
                report.add(finding)
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            report.add(Finding("internal", "warning", f"check {name!r} could not run",
                               [f"{type(e).__name__}: {e}"], "report this to fasttune with the model's config.json"))
    data_err = folder.data_token_ids[1] if data is not None else None
    if data_err:
        report.add(Finding("data", "error", f"could not read --data {data}", [data_err], "fix the data file"))
    return report


def repair(report: Report, out_dir: str | os.PathLike) -> list[str]:
    """Write a repaired copy of the diagnosed folder to `out_dir`; returns the repairs applied."""
    if report.folder is None:
        raise ValueError("this report has no model folder attached: make it with diagnose()")
    return _repair(report.folder, report, out_dir)


__all__ = ["Finding", "ModelFolder", "Report", "diagnose", "repair"]
