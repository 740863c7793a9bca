"""RunData -> one HTML page: verdict, diagnoses, curves, data summary, config.

The order is the order of a reader's questions: did the run go wrong (the
verdict and the diagnoses, with what to do), where does it show (the curves,
marked at the diagnosed steps), and was it the data or the settings (the data
summary and the resolved config). The page has no script and links nothing
outside itself.
"""

from __future__ import annotations

from html import escape
from typing import Any, Optional

from dpokit.version import __version__
from dpokit.report.charts import PLOTS, Plot, build_chart
from dpokit.report.eval_table import eval_section
from dpokit.report.run_data import RunData, number
from dpokit.report.style import CSS
from dpokit.report.svg import fmt, line_chart

VERDICT_TEXT = {
    "healthy": "No failure mode detected.",
    "warnings": "The failure detectors raised warnings: read them below.",
    "stopped": "Training was stopped by a failure detector.",
    "no metrics": "Nothing has been logged yet.",
}

CLOCK_KEYS = frozenset({"tokens_per_second", "mfu"})  # metrics of the clock and the machine (training/throughput.py's)
TILES = (  # (label, key[, format]) for the headline numbers: the last finite value logged
    ("loss", "loss"), ("accuracy", "rewards/accuracies"), ("margin", "rewards/margins"), ("KL over chosen (kl/chosen)", "kl/chosen"),
    ("eval loss", "eval_loss"), ("eval accuracy", "eval_rewards/accuracies"), ("eval length", "eval_mean_length"),
    ("tokens/s", "tokens_per_second", "{:,.0f}"), ("MFU", "mfu", "{:.1%}"),
)  # fmt: skip


def _last(records: list[dict], key: str) -> Optional[float]:
    for record in reversed(records):
        value = number(record.get(key))
        if value is not None:
            return value
    return None


def _setting_text(run: RunData, section: str, key: str) -> Optional[str]:
    value = run.setting(section, key)
    if value in (None, "", [], {}):
        return None
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _header(run: RunData) -> str:
    verdict = run.verdict
    meta = [
        (label, _setting_text(run, section, key))
        for label, section, key in (
            ("model", "model", "name_or_path"),
            ("loss", "loss", "type"),
            ("beta", "loss", "beta"),
            ("lr", "optim", "lr"),
        )
    ]
    meta_html = " &middot; ".join(f"{label} <b>{escape(text)}</b>" for label, text in meta if text)
    last, planned = run.last_step, run.planned_steps
    steps = "-" if last is None else f"{last}" + (f" / {planned}" if planned else "")
    tiles = [("steps", steps, "")]
    tiles += [
        (label, form[0].format(value) if form else fmt(value), key)
        for label, key, *form in TILES
        if (value := _last(run.eval if key.startswith("eval_") else run.train, key)) is not None
    ]
    tiles_html = "".join(
        clock(
            f'<div class="tile"><div class="label">{escape(label)}</div><div class="value">{escape(v)}</div></div>',
            key in CLOCK_KEYS,
        )
        for label, v, key in tiles
    )
    stops = [d for d in run.diagnoses if d.get("severity") == "stop"]
    detail = VERDICT_TEXT[verdict]
    if stops:
        detail = f"Stopped at step {stops[0].get('step')}: {stops[0].get('mode')}." + (
            f" {len(run.diagnoses) - 1} other diagnosis(es)." if len(run.diagnoses) > 1 else ""
        )
    elif run.diagnoses:
        modes = ", ".join(f"{d.get('mode')} (step {d.get('step')})" for d in run.diagnoses[:4])
        detail = f"{len(run.diagnoses)} warning(s): {modes}" + (" ..." if len(run.diagnoses) > 4 else "")
    elif run.skipped:  # warnings only because of skipped updates: the detectors themselves raised nothing
        detail = ""
    if run.skipped:
        detail = f"{detail} {len(run.skipped)} optimizer update(s) skipped on a NaN/Inf loss or gradient.".strip()
    return (
        '<header class="card"><div class="kicker">dpokit run report</div>'
        f'<div class="title-row"><h1>{escape(str(run.run_dir))}</h1>'
        f'<span class="verdict {verdict.replace(" ", "-")}" id="verdict">{escape(verdict)}</span></div>'
        f'<p class="meta">{escape(detail)}</p>'
        + (f'<p class="meta">{meta_html}</p>' if meta_html else "")
        + f'<div class="tiles">{tiles_html}</div>'
        '<nav><a href="#diagnostics">Diagnostics</a><a href="#curves">Curves</a>'
        '<a href="#data">Data</a><a href="#config">Config</a></nav></header>'
    )


def _notes(run: RunData) -> str:
    if not run.notes:
        return ""
    items = "".join(f"<li>{escape(note)}</li>" for note in run.notes)
    return f'<div class="notes" id="notes"><b>Notes</b><ul>{items}</ul></div>'


def _diagnostics(run: RunData) -> str:
    if run.diagnoses_source == "recorded":
        source = "Raised by the failure detectors during training and recorded in metrics.jsonl."
    else:
        source = (
            "metrics.jsonl holds no diagnosis records, so dpokit's failure detectors (default thresholds) "
            "were replayed over the logged metrics."
        )
    parts = [f'<section id="diagnostics"><h2>Diagnostics</h2><p class="source">{escape(source)}</p>']
    if not run.diagnoses:
        checked = (
            "No metrics were logged, so nothing could be checked."
            if run.verdict == "no metrics"
            else (
                "The failure detectors found nothing: no likelihood displacement, length drift, KL drift, over-optimisation, "
                "stuck accuracy, oscillating loss, rising eval loss or NaN/Inf."
            )
        )
        parts.append(f'<div class="card all-clear">{escape(checked)}</div>')
    advised: dict[str, str] = {}  # mitigation text -> the first mode that showed it in full
    for d in run.diagnoses:
        severity = "stop" if d.get("severity") == "stop" else "warn"
        mode, mitigation = str(d.get("mode", "?")), str(d.get("mitigation", ""))
        # Several modes share one piece of advice (KL drift, over-optimisation, rising eval loss):
        # print it once and point back to it, so the list stays readable.
        todo = f"same as for {advised[mitigation]} above." if mitigation in advised else mitigation
        advised.setdefault(mitigation, mode)
        parts.append(
            f'<article class="card diag {severity}"><h3><span class="sev">{severity}</span>{escape(mode)}'
            f' <span class="meta">at step {escape(str(d.get("step", "?")))}</span></h3>'
            f"<p>{escape(str(d.get('evidence', '')))}</p>"
            f'<p class="todo"><b>What to do:</b> {escape(todo)}</p></article>'
        )
    parts.append(_skipped(run))
    parts.append("</section>")
    return "".join(parts)


def _skipped(run: RunData) -> str:
    if not run.skipped:
        return ""
    cell = lambda v: escape(fmt(v)) if number(v) is not None else escape(str(v))  # noqa: E731
    rows = "".join(
        f"<tr><td class='num'>{escape(str(d.get('step', '?')))}</td><td>{escape(str(d.get('reason', '')))}</td>"
        f"<td class='num'>{cell(d.get('loss'))}</td><td class='num'>{cell(d.get('grad_norm'))}</td></tr>"
        for d in run.skipped
    )
    return (
        '<article class="card diag warn" id="skipped"><h3><span class="sev">skip</span>skipped updates</h3>'
        f"<p>{len(run.skipped)} optimizer step(s) had a non-finite loss or gradient; their update was not applied "
        "(train.max_skipped_steps sets how many a run tolerates before it stops).</p>"
        "<table><tr><th class='num'>step</th><th>reason</th><th class='num'>loss</th><th class='num'>grad norm</th></tr>"
        f"{rows}</table></article>"
    )


def _legend(chart) -> str:
    items = []
    for s in chart.series:
        dashed = " dashed" if s.dashed else ""
        items.append(f'<span><i class="swatch{dashed}" style="border-color:{s.color}"></i>{escape(s.label)}</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def clock(html: str, volatile: bool) -> str:
    """`html` between <!--clock--> markers when it shows wall-clock numbers (tokens/s, MFU): two runs of the same
    commit differ there and nowhere else, and bench/compare_runs.py leaves the marked parts out."""
    return f"<!--clock-->{html}<!--/clock-->" if volatile else html


def _plot(plot: Plot, run: RunData, keys: set[str]) -> str:
    return clock(_plot_card(plot, run, keys), any(line.key in CLOCK_KEYS for line in plot.lines))


def _plot_card(plot: Plot, run: RunData, keys: set[str]) -> str:
    chart = build_chart(plot, run)
    head = f'<div class="card plot" id="plot-{plot.key}"><h3>{escape(plot.title)}</h3>'
    if chart is None:
        logged = any(line.key in keys or f"eval_{line.key}" in keys for line in plot.lines)
        why = "logged, but every value is NaN/Inf (null in metrics.jsonl)" if logged else plot.missing
        return head + f'<div class="empty">{escape(why)}</div><p class="about">{escape(plot.about)}</p></div>'
    return head + _legend(chart) + line_chart(chart) + f'<p class="about">{escape(plot.about)}</p></div>'


def _curves(run: RunData) -> str:
    if not run.train and not run.eval:
        return '<section id="curves"><h2>Curves</h2><div class="card">No metrics logged.</div></section>'
    keys = run.keys()
    cards = "".join(_plot(plot, run, keys) for plot in PLOTS)
    return (
        '<section id="curves"><h2>Curves</h2><p class="source">Solid: training records; dashed with dots: '
        "eval records. Vertical dashed lines mark the steps at which a diagnosis fired.</p>"
        f'<div class="grid">{cards}</div></section>'
    )


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td class='num'>{escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _split(name: str, s: dict) -> str:
    if not isinstance(s, dict):
        return ""
    if not s.get("rows_read") and not s.get("pairs"):
        return f'<div><h3>{escape(name)}</h3><p class="source">no {escape(name)} rows</p></div>'
    unit = "examples" if "labels" in s else "pairs"
    rows = [
        ("rows read", s.get("rows_read", "-")),
        (f"{unit} used", s.get("pairs", "-")),
        ("rows dropped", s.get("rows_skipped", "-")),
    ]
    if s.get("held_out"):
        rows.append(("held out for eval", s["held_out"]))
    if isinstance(s.get("layouts"), dict) and s["layouts"]:
        rows.append(("layouts", ", ".join(f"{k}: {v}" for k, v in s["layouts"].items())))
    if isinstance(s.get("labels"), dict):
        rows.append(("labels", ", ".join(f"{k}: {v}" for k, v in s["labels"].items())))
    truncated = s.get("truncated")
    if isinstance(truncated, dict):
        rows.append(("truncated", ", ".join(f"{k}: {v}" for k, v in truncated.items())))
    html = [f"<div><h3>{escape(name)}</h3>", _table(rows)]
    reasons = s.get("skipped_by_reason") or {}
    if isinstance(reasons, dict) and reasons:
        examples = s.get("skipped_examples") or {}
        body = "".join(
            f"<tr><td>{escape(str(reason))}</td><td class='num'>{escape(str(n))}</td>"
            f"<td>{escape('; '.join(map(str, examples.get(reason, [])[:3])))}</td></tr>"
            for reason, n in reasons.items()
        )
        html.append(f"<table><tr><th>dropped because</th><th class='num'>rows</th><th>e.g.</th></tr>{body}</table>")
    lengths = s.get("token_lengths") or {}
    if isinstance(lengths, dict) and lengths:
        cols = ("min", "p50", "p90", "p99", "max")
        head = "".join(f"<th class='num'>{c}</th>" for c in cols)
        body = "".join(
            f"<tr><td>{escape(str(part))}</td>"
            + "".join(f"<td class='num'>{escape(str(p.get(c, '-')))}</td>" for c in cols)
            + "</tr>"
            for part, p in lengths.items()
            if isinstance(p, dict)
        )
        html.append(f"<table><tr><th>tokens</th>{head}</tr>{body}</table>")
    html.append("</div>")
    return "".join(html)


def _data(run: RunData) -> str:
    if not run.data_summary:
        body = '<div class="card">No data summary (data_summary.json) in the run directory.</div>'
    else:
        splits = "".join(_split(name, s) for name, s in run.data_summary.items())
        body = f'<div class="card split-grid">{splits}</div>'
    return f'<section id="data"><h2>Data</h2>{body}</section>'


def _config(run: RunData) -> str:
    if run.config_text is None:
        body = '<div class="card">No resolved config (config.yaml) in the run directory.</div>'
    else:
        # One block per top-level section, kept whole within a column, so "max_length: 48" is read under "data:".
        blocks: list[list[str]] = []
        for line in run.config_text.splitlines():
            if not blocks or (line[:1].strip() and not line.startswith("- ")):
                blocks.append([])
            blocks[-1].append(line)
        pres = "".join(f"<pre>{escape(chr(10).join(block))}</pre>" for block in blocks)
        body = f'<div class="config">{pres}</div>'
    return f'<section id="config"><h2>Resolved config</h2>{body}</section>'


def render(run: RunData) -> str:
    """The whole report as one HTML document."""
    title = f"dpokit report: {run.run_dir.name or run.run_dir} ({run.verdict})"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
        + _header(run)
        + _notes(run)
        + _diagnostics(run)
        + _curves(run)
        + eval_section(run.run_dir)
        + _data(run)
        + _config(run)
        + f"<footer>dpokit {escape(__version__)} &middot; one self-contained file: no scripts, "
        "nothing loaded from the network</footer></main></body></html>\n"
    )
