"""The doctor's findings: one `CheckResult` per check, gathered in a `DoctorReport`, printed as a table.

Every check states a verdict, the numbers behind it, and (when it is not ok)
what to do, so a user can act on the report without reading the code.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Verdict = Literal["ok", "warn", "fail", "skip"]
# Worst first: the report's overall verdict is its worst check's.
SEVERITY_ORDER: dict[str, int] = {"fail": 3, "warn": 2, "ok": 1, "skip": 0}


@dataclass
class CheckResult:
    """One check: `summary` gives the numbers in a line; `numbers` holds them for machines."""

    name: str
    verdict: Verdict
    summary: str
    advice: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # "file:row" pointers to rows worth a look


@dataclass
class DoctorReport:
    """Every check run on one data file (and, optionally, one model)."""

    data_path: str
    model: str | None = None
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    def add(self, check: CheckResult) -> CheckResult:
        self.checks.append(check)
        return check

    def check(self, name: str) -> CheckResult:
        """The result of the check called `name` (KeyError if it did not run)."""
        for result in self.checks:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r}; checks: {', '.join(c.name for c in self.checks)}")

    @property
    def verdict(self) -> Verdict:
        """The worst verdict of any check ("ok" when every check passed or was skipped)."""
        worst = max((c.verdict for c in self.checks), key=SEVERITY_ORDER.__getitem__, default="ok")
        return "ok" if worst == "skip" else worst

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_path": self.data_path,
            "model": self.model,
            "verdict": self.verdict,
            "checks": [asdict(c) for c in self.checks],
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _wrap(text: str, width: int, **kwargs) -> list[str]:
    """textwrap.wrap that breaks only at spaces: a path or hub id stays whole so it can be pasted."""
    return textwrap.wrap(text, width=width, break_long_words=False, break_on_hyphens=False, **kwargs)


def format_report(report: DoctorReport, width: int = 100) -> str:
    """A table of check | verdict | numbers, then the advice for every check that is not ok."""
    name_width = max([len("check")] + [len(c.name) for c in report.checks])
    header = f"{'check':<{name_width}}  verdict  result"
    lines = [
        f"dpokit doctor: {report.data_path}" + (f" with model {report.model}" if report.model else ""),
        "",
        header,
        "-" * min(width, max(len(header), 60)),
    ]
    summary_indent = " " * (name_width + 11)
    for check in report.checks:
        wrapped = _wrap(check.summary, max(40, width - len(summary_indent))) or [""]
        lines.append(f"{check.name:<{name_width}}  {check.verdict.upper():<7}  {wrapped[0]}")
        lines.extend(summary_indent + more for more in wrapped[1:])
    advice = [c for c in report.checks if c.verdict in ("warn", "fail") and c.advice]
    if advice:
        lines += ["", "What to do:"]
        for check in advice:
            lines.extend(
                _wrap(
                    f"{check.name} ({check.verdict}): {check.advice}",
                    width,
                    initial_indent="  ",
                    subsequent_indent="    ",
                )
            )
            if check.examples:
                lines.append(f"    e.g. {'; '.join(check.examples[:3])}")
    for note in report.notes:
        lines.extend(_wrap(f"note: {note}", width, subsequent_indent="      "))
    lines += ["", f"overall: {report.verdict.upper()}"]
    return "\n".join(lines)
