"""Findings and the report that lists them.

A finding says what is wrong (title), how we know (evidence), how bad it is (severity) and what to do (fix).
`repair` carries the machine-readable part of the fix that `fasttune doctor --fix` applies; None when the fix
needs a person (e.g. a NaN in a weight: nothing to repair it from)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")  # error: training will go wrong; warning: likely wrong; info: worth knowing


@dataclass
class Finding:
    check: str  # stable id, e.g. "untrained-tokens"
    severity: str
    title: str
    evidence: list[str] = field(default_factory=list)
    fix: str = ""
    repair: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")


@dataclass
class Report:
    model_dir: str
    findings: list[Finding] = field(default_factory=list)
    checks_run: list[str] = field(default_factory=list)
    folder: Any = field(default=None, repr=False, compare=False)  # the ModelFolder diagnosed (for repair)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def problems(self) -> list[Finding]:
        """Errors and warnings (what a clean model must not have)."""
        return [f for f in self.findings if f.severity != "info"]

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def format(self, show_info: bool = True) -> str:
        order = {s: i for i, s in enumerate(SEVERITIES)}
        shown = sorted((f for f in self.findings if show_info or f.severity != "info"), key=lambda f: order[f.severity])
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        lines = [f"fasttune doctor: {self.model_dir}",
                 f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} note(s) "
                 f"from {len(self.checks_run)} checks"]
        for f in shown:
            lines.append("")
            lines.append(f"[{f.severity.upper()}] {f.check}: {f.title}")
            lines += [f"    {e}" for e in f.evidence]
            if f.fix:
                auto = " (--fix repairs this)" if f.repair is not None else ""
                lines.append(f"    fix{auto}: {f.fix}")
        if not self.problems():
            lines += ["", "no problems found"]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"model_dir": self.model_dir, "checks_run": self.checks_run,
                           "findings": [asdict(f) for f in self.findings]}, indent=2, default=str)
