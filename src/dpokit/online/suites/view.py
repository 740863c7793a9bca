"""`dpokit eval --out FILE.json`: the metrics as JSON and, beside it, FILE.md: policy vs baseline on every evaluation.

The table itself is built in report/eval_table.py (so `dpokit report` can show a run's eval.json too).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpokit.report.eval_table import markdown

__all__ = ["markdown", "write_view"]


def _finite(value):
    """JSON has no NaN: a value that could not be measured is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_view(metrics: dict, out: str | Path) -> tuple[Path, Path]:
    """Write the metrics (JSON, NaN as null) and the markdown table beside them; returns both paths."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(metrics), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = path.with_suffix(".md")
    table.write_text(markdown(metrics), encoding="utf-8")
    return path, table
