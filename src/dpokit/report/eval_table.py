"""`dpokit eval`'s one view: policy vs baseline on every evaluation that ran, with standard errors.

`rows(metrics)` reads the JSON `dpokit eval --out` writes (its flat metrics and its "suites" mapping) into
(suite, metric, policy, baseline) rows; `markdown` is the table `dpokit eval` writes beside the JSON, and
`eval_section` the section of the run report when RUN_DIR/eval.json exists. A comparison of the two (a win
rate) has the policy's value only: the baseline's is 50% by definition.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any, Optional

from dpokit.inputs import loads_bounded
from dpokit.report.run_data import run_file_text

EVAL_FILE = "eval.json"  # where `dpokit report` looks for a run's evaluation

# (suite, label, key in the policy's results, key in the baseline's, format)
BASE_ROWS = [
    ("samples", "mean score", "mean_score", "baseline_mean_score", "{:.3f}"),
    ("samples", "win rate vs baseline", "win_rate", None, "{:.1%}"),
    ("samples", "unjudged (left out of the win rate)", "win_rate_unjudged", None, "{:d}"),
    # Both KLs are per completion over the policy's samples with the same expectation; the exact next-token sum
    # (Rao-Blackwellised) has far less variance than k3 of the sequence log-ratio, so it leads.
    (
        "samples",
        "KL(policy || reference), nats, exact next-token KL summed over the samples",
        "kl_tokenwise",
        None,
        "{:.2f}",
    ),
    ("samples", "KL(policy || reference), nats, k3 of the sampled log-ratio", "kl_to_reference", None, "{:.2f}"),
    ("samples", "held-out preference accuracy", "preference_accuracy", None, "{:.1%}"),
    ("samples", "mean length (tokens)", "mean_length", "baseline_mean_length", "{:.1f}"),
]
# The shipped suites' rows (online/suites/runner.py's table names them); eval.json carries every suite's rows as
# "suite_rows", so a suite added since shows too. These serve the eval.json files written before it did.
SUITE_ROWS = {
    "ifeval": [
        ("prompt-level strict", "prompt_level_strict_acc", "{:.1%}"),
        ("instruction-level strict", "inst_level_strict_acc", "{:.1%}"),
        ("prompt-level loose", "prompt_level_loose_acc", "{:.1%}"),
        ("instruction-level loose", "inst_level_loose_acc", "{:.1%}"),
    ],
    "lc_winrate": [
        ("length-controlled win rate", "lc_win_rate", "{:.1%}"),
        ("raw win rate", "raw_win_rate", "{:.1%}"),
        ("mean length difference (tokens)", "mean_length_diff", "{:+.1f}"),
    ],
    "multiturn": [
        ("turn 1 score (1-10)", "turn1_score", "{:.2f}"),
        ("turn 2 score (1-10)", "turn2_score", "{:.2f}"),
        ("score (1-10)", "score", "{:.2f}"),
        ("judge parse failures", "parse_failures", "{:d}"),
        ("turn 1 win rate", "turn1_win_rate", "{:.1%}"),
        ("turn 2 win rate", "turn2_win_rate", "{:.1%}"),
        ("win rate", "win_rate", "{:.1%}"),
        ("unjudged verdicts", "unjudged", "{:d}"),
    ],
}


FORMATS = ("{:.1%}", "{:.1f}", "{:+.1f}", "{:.2f}", "{:.3f}", "{:d}")  # a row's format, from eval.json, is one of these


def _suite_rows(metrics: dict, suite: str) -> list:
    """(label, key, format) of a suite's rows: those eval.json carries, else the shipped suite's; a row whose format
    is not one of FORMATS (eval.json is a file like any other) is left out."""
    carried = (metrics.get("suite_rows") or {}).get(suite)
    return [row for row in (carried or SUITE_ROWS.get(suite, [])) if len(row) == 3 and row[2] in FORMATS]


def _cell(results: Optional[dict], key: Optional[str], fmt: str) -> str:
    if not results or key is None or results.get(key) is None:
        return ""
    value = results[key]
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    text = fmt.format(value)
    sem = results.get(f"{key}_sem")
    if isinstance(sem, (int, float)) and math.isfinite(sem):
        text += " ± " + (fmt.replace("+", "") if ("f" in fmt or "%" in fmt) else "{:.2f}").format(sem)
    return text


def rows(metrics: dict) -> list[tuple[str, str, str, str]]:
    """(suite, metric, policy, baseline) for every number present; empty cells where a side was not measured."""
    out = []
    for suite, label, key, base_key, fmt in BASE_ROWS:
        if metrics.get(key) is not None:
            out.append((suite, label, _cell(metrics, key, fmt), _cell(metrics, base_key, fmt)))
    for suite, result in (metrics.get("suites") or {}).items():
        for label, key, fmt in _suite_rows(metrics, suite):
            policy, baseline = result.get("policy", result), result.get("baseline")
            if policy.get(key) is not None:
                out.append((suite, label, _cell(policy, key, fmt), _cell(baseline, key, fmt)))
    return out


def markdown(metrics: dict) -> str:
    lines = ["| suite | metric | policy | baseline |", "|---|---|---|---|"]
    lines += [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows(metrics)
    ]  # "||" of KL is no column
    lines.append("")
    lines.append("Values ± standard error. A win rate compares the policy with the baseline (the baseline's is 50%).")
    if metrics.get("kl_tokenwise") is not None and metrics.get("kl_to_reference") is not None:
        lines.append(
            "The two KL rows estimate the same KL from the same samples (same expectation): the exact next-token "
            "sum has the smaller standard error; k3 of the whole completion's log-ratio is noisier, and a gap "
            "between them within a few of its standard errors is that noise."
        )
    return "\n".join(lines) + "\n"


def eval_section(run_dir: Path) -> str:
    """The report's evaluation section when RUN_DIR/eval.json exists ('' otherwise, or a note if it is unreadable)."""
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        return ""
    notes: list[str] = []
    try:  # through the input gateway, like the run's other files: a RUN_DIR is named by the user
        metrics: Any = loads_bounded(run_file_text(path, notes) or "null")
        table = rows(metrics)
    except (ValueError, AttributeError, TypeError, RecursionError) as e:
        return f'<section id="evaluation"><h2>Evaluation</h2><p class="note">{escape(EVAL_FILE)} could not be read: {escape(str(e))}</p></section>'
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in table)
    return (
        '<section id="evaluation"><h2>Evaluation</h2><p class="source">From eval.json (`dpokit eval --out`): '
        "values ± standard error; a win rate compares the policy with the baseline.</p>"
        f"<table><tr><th>suite</th><th>metric</th><th>policy</th><th>baseline</th></tr>{body}</table></section>"
    )
