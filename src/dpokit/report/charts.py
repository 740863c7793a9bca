"""Which curves the report draws, from which metrics.jsonl keys, and what each one tells you.

Train records give solid lines; the same metric from eval records (TRL's
`eval_` prefix) is drawn dashed with a dot per evaluation, in the same colour,
so a gap between train and eval reads at a glance. A diagnosis marks the
charts that show its evidence (a KL warning marks the KL chart, not the
learning rate), so the marker points at the curve to read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from dpokit.report.run_data import RunData, number
from dpokit.report.svg import Chart, Rule, Series

BLUE, GREEN, RED, PURPLE, TEAL, AMBER, SLATE, PINK = (
    "#2563eb", "#16a34a", "#dc2626", "#7c3aed", "#0d9488", "#d97706", "#475569", "#db2777")  # fmt: skip


@dataclass(frozen=True)
class Line:
    key: str  # training key; the eval series is "eval_" + key
    label: str
    color: str


@dataclass(frozen=True)
class Plot:
    key: str
    title: str
    lines: tuple[Line, ...]
    about: str  # what the curve shows and what a bad one looks like
    missing: str = "not logged in this run"
    y_range: Optional[tuple[float, float]] = None
    every_record: bool = (
        False  # one series from train and eval records alike (retention/*: logged at evaluations, no eval_ prefix)
    )


PLOTS = (
    Plot(
        "loss",
        "Loss",
        (Line("loss", "loss", BLUE),),
        "The preference loss per pair (sigmoid DPO starts at log 2 = 0.693). Eval should fall with train; "
        "eval rising while train falls is over-fitting (eval_loss_rising).",
    ),
    Plot(
        "rewards",
        "Rewards: chosen vs rejected",
        (Line("rewards/chosen", "chosen", GREEN), Line("rewards/rejected", "rejected", RED)),
        "Implicit rewards beta * log(policy / reference) of each completion. Healthy: chosen above rejected. "
        "Both may fall; chosen falling fast is likelihood displacement.",
    ),
    Plot(
        "margins",
        "Reward margin",
        (Line("rewards/margins", "margin", PURPLE),),
        "Mean chosen minus rejected reward. It should grow and then level off; growing without a plateau "
        "while eval loss rises is reward over-optimisation.",
        missing="no rewards/margins logged (KTO scores unpaired completions: see the rewards chart)",
    ),
    Plot(
        "accuracies",
        "Preference accuracy",
        (Line("rewards/accuracies", "accuracy", TEAL),),
        "Share of pairs whose chosen completion gets the higher reward (KTO: examples on the right side of "
        "the KL baseline). Stuck near 0.5 means nothing is being learned.",
        y_range=(0.0, 1.0),
    ),
    Plot(
        "logps",
        "Log-probabilities",
        (Line("logps/chosen", "chosen", GREEN), Line("logps/rejected", "rejected", RED)),
        "Policy log-probability of each completion, nats per sequence. Chosen falling steeply while the "
        "margin rises is likelihood displacement: the model unlearns the good answer too.",
    ),
    Plot(
        "kl",
        "KL(policy || reference) per sequence, exact over the chosen completion (training metric kl/chosen)",
        (Line("kl/chosen", "KL along chosen", AMBER), Line("kl", "KL baseline z0 (KTO)", PINK)),
        "kl/chosen: the exact next-token KL(policy || reference) summed over the positions of each training pair's chosen "
        "completion, in nats per sequence. It is not the KL that `dpokit eval` and `dpokit demo` show, which is "
        "estimated from the policy's own samples (k3), so the two numbers differ. The guide's alarm is 5-10 nats: "
        "beyond it the policy has likely drifted too far (kl_drift).",
        missing="no KL logged: reference-free losses run no reference, and reference log-probs read from the "
        "cache (speed.ref_cache, the default) come without next-token distributions; speed.ref_cache=false "
        "logs kl/chosen (LoRA runs with eval data log eval_kl/chosen anyway)",
    ),
    Plot(
        "entropy",
        "Policy entropy",
        (Line("entropy", "entropy (nats per token)", SLATE),),
        "Mean entropy of the policy's next-token distribution over the completion tokens (TRL's `entropy`). "
        "A slide towards 0 is the policy turning deterministic; a rise is probability spread onto tokens "
        "that do not fit.",
        missing="not logged in this run (paired losses log it)",
    ),
    Plot(
        "lengths",
        "Completion length",
        (Line("mean_length", "mean length (tokens)", SLATE),),
        "Mean length of sampled completions. Growing past 1.5x its first value is length hacking; "
        "shrinking below 0.67x is a symptom of forgetting (length_drift).",
        missing="not logged: set train.eval_generate=N to sample N completions at each evaluation "
        "and log eval_mean_length",
    ),
    Plot(
        "retention",
        "Retention NLL (data.retention_path)",
        (Line("retention/nll", "policy", BLUE), Line("retention/nll_ref", "reference", SLATE)),
        "Token-mean NLL of the retention set's completions, nats per token, at each evaluation (and before the first "
        "step). The policy's line leaving the reference's upwards is forgetting: the run is unlearning that text.",
        missing="not logged: set data.retention_path to SFT rows the run should not forget",
        every_record=True,
    ),
    Plot(
        "retention_delta",
        "Retention drift: policy minus reference NLL",
        (Line("retention/nll_delta", "retention/nll_delta", RED),),
        "retention/nll - retention/nll_ref in nats per token. The forgetting detector fires above "
        "max(detectors.forgetting_nll_delta, detectors.forgetting_nll_delta_fraction x the reference NLL); SFT mixing "
        "(data.sft_mix_path) and a higher loss.beta keep it down.",
        missing="not logged: set data.retention_path",
        every_record=True,
    ),
    Plot(
        "learning_rate",
        "Learning rate",
        (Line("learning_rate", "learning rate", BLUE),),
        "The scheduled learning rate at each logged step (warm-up, then decay).",
    ),
    Plot(
        "grad_norm",
        "Gradient norm",
        (Line("grad_norm", "grad norm", PURPLE),),
        "Global gradient norm before clipping. Spikes precede NaN losses; a norm that sits at the clipping "
        "threshold means every step is clipped.",
    ),
    Plot(
        "throughput",
        "Throughput (tokens/s)",
        (Line("tokens_per_second", "tokens/s", TEAL),),
        "Real (unpadded) tokens trained per second over each logging window, all processes together: prompt + chosen "
        "and prompt + rejected per pair, as num_tokens counts them, whatever the packing. padding_fraction and mfu "
        "(model FLOPs over the devices' peak, named by mfu_peak_source in the first record) are logged beside it "
        "(docs/performance.md). A dip is a slower window: an evaluation or checkpoint inside it, or longer sequences.",
        missing="not logged in this run (runs from before throughput metrics)",
    ),
)

# The charts that show each failure mode's evidence.
MARKED = {
    "non_finite": {"loss", "grad_norm"},
    "likelihood_displacement": {"logps", "margins", "rewards"},
    "length_drift": {"lengths"},
    "kl_drift": {"kl"},
    "over_optimisation": {"margins", "loss"},
    "stuck_accuracy": {"accuracies"},
    "oscillating_loss": {"loss"},
    "eval_loss_rising": {"loss"},
    "forgetting": {"retention", "retention_delta"},
}


def points(records: list[dict], key: str) -> list[tuple[float, Optional[float]]]:
    """(step, value) for every record holding `key`; null/NaN stays as None so the line breaks there."""
    out = []
    for i, record in enumerate(records):
        if key in record:
            step = number(record.get("step"))
            out.append((step if step is not None else float(i + 1), number(record[key])))
    return out


def _rules(plot: Plot, run: RunData, series: list[Series]) -> list[Rule]:
    values = [y for s in series for _, y in s.points if y is not None]
    top = max(values, default=0.0)
    rules = []
    loss_type = run.setting("loss", "type")
    if plot.key == "loss" and loss_type in ("sigmoid", ["sigmoid"]):
        rules.append(Rule(math.log(2), "log 2"))
    if plot.key == "accuracies":
        rules.append(Rule(0.5, "chance"))
    if plot.key == "retention_delta":
        rules += _forgetting_rules(run, series, top)
    if plot.key == "kl":  # only thresholds near the data, so a healthy run's curve is not squashed flat
        rules += [Rule(v, f"{v:g} nats", AMBER if v == 5 else RED) for v in (5.0, 10.0) if v <= 2 * top]
    clip = run.setting("optim", "max_grad_norm")
    if plot.key == "grad_norm" and isinstance(clip, (int, float)) and 0 < clip <= 2 * top:
        rules.append(Rule(float(clip), f"clip {clip:g}"))
    if plot.key in ("loss", "grad_norm"):
        rules += [
            Rule(
                float(d["step"]), f"update skipped at step {d['step']}: {d.get('reason', 'non-finite')}", RED, axis="x"
            )
            for d in run.skipped
            if number(d.get("step")) is not None
        ]
    for d in run.diagnoses:
        if plot.key in MARKED.get(str(d.get("mode")), set()) and number(d.get("step")) is not None:
            color = RED if d.get("severity") == "stop" else AMBER
            rules.append(
                Rule(
                    float(d["step"]),
                    f"{d.get('severity', 'warn')}: {d.get('mode')} at step {d['step']}",
                    color,
                    axis="x",
                )
            )
    return rules


def _forgetting_rules(run: RunData, series: list[Series], top: float) -> list[Rule]:
    """The forgetting detector's threshold at the last reference NLL logged, when it is near the data."""
    refs = [number(r.get("retention/nll_ref")) for r in run.train + run.eval]
    refs = [v for v in refs if v is not None]
    absolute, fraction = (
        run.setting("detectors", "forgetting_nll_delta"),
        run.setting("detectors", "forgetting_nll_delta_fraction"),
    )
    if not refs or not all(isinstance(v, (int, float)) for v in (absolute, fraction)):
        return []
    limit = max(float(absolute), float(fraction) * refs[-1])
    return (
        [Rule(limit, f"forgetting {limit:.3g}", RED)] if limit <= 2 * top else []
    )  # as the KL rules: only near the data


def build_chart(plot: Plot, run: RunData) -> Optional[Chart]:
    """The chart for `plot`, or None when none of its metrics has a finite value in this run."""
    series = []
    if plot.every_record:
        records = sorted(run.train + run.eval, key=lambda r: number(r.get("step")) or 0.0)
        series = [
            Series(line.key, line.label, points(records, line.key), line.color, dots=True)
            for line in plot.lines
            if points(records, line.key)
        ]
    for line in plot.lines if not plot.every_record else ():
        train = points(run.train, line.key)
        if train:
            series.append(Series(line.key, f"{line.label} (train)", train, line.color))
        evals = points(run.eval, "eval_" + line.key)
        if evals:
            series.append(Series("eval_" + line.key, f"{line.label} (eval)", evals, line.color, dashed=True, dots=True))
    if not any(y is not None for s in series for _, y in s.points):
        return None
    return Chart(plot.key, series, _rules(plot, run, series), plot.y_range)
