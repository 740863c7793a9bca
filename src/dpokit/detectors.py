"""Failure detectors over a run's metrics history: say *while training* that the run is going wrong.

A DPO loss can fall steadily while the run fails: margins can grow because the
chosen completion gets *less* likely, the policy can drift far from the
reference, or the data can be too noisy to learn. `FailureDetectors` reads the
records written to metrics.jsonl one at a time and returns a `Diagnosis` the
first time each failure shows, with the numbers that show it and what to do.

    detectors = FailureDetectors(early_stop_patience=3)
    for record in records:            # dicts as written to metrics.jsonl
        for diagnosis in detectors.update(record):
            print(diagnosis)
        if detectors.should_stop:
            break

The mitigations (mitigations.py) quote the "Failure Modes & Debugging" guide shipped
with the project (docs/diagnosis.md lists which advice comes from it) and name the
dpokit settings that apply it. Thresholds are constructor arguments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

from dpokit.config import DetectorsConfig
from dpokit.mitigations import MITIGATIONS

Severity = Literal["warn", "stop"]


@dataclass(frozen=True)
class Diagnosis:
    """One failure mode seen at `step`: the numbers that show it and what to do about it."""

    mode: str
    step: int
    evidence: str
    mitigation: str
    severity: Severity = "warn"

    def __str__(self) -> str:
        return f"[dpokit] {self.severity}: {self.mode} at step {self.step}: {self.evidence}\n  what to do: {self.mitigation}"


def _value(record: dict, key: str) -> Optional[float]:
    """The finite number under `key`, or None when the key is absent, null (a NaN in metrics.jsonl) or non-finite."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# A detector's answer for one condition: (level, diagnosis) when it holds, None when it was checked and does not.
Finding = Optional[tuple[int, Diagnosis]]


class FailureDetectors:
    """Stateful detectors; call `update` once per logged record (train or eval), in order.

    Each condition fires once; it fires again only after it has cleared and come
    back, or when it escalates (KL above `kl_high` after above `kl_warn`, eval
    loss rising past `early_stop_patience` after `eval_rise_count`). A
    record that does not carry a detector's metrics leaves that detector's state
    alone, so interleaved eval records do not clear training conditions.
    """

    def __init__(self, thresholds: DetectorsConfig | None = None, **overrides) -> None:
        """thresholds: config.DetectorsConfig (the run's `detectors:` section); overrides: some of its fields by name."""
        c = dataclasses.replace(thresholds or DetectorsConfig(), **overrides)
        self.chosen_logp_drop, self.chosen_logp_drop_fraction = c.chosen_logp_drop, c.chosen_logp_drop_fraction
        self.margin_rise, self.smoothing = c.margin_rise, max(1, c.smoothing)
        self.length_growth, self.length_shrink = c.length_growth, c.length_shrink
        self.kl_warn, self.kl_high = c.kl_warn, c.kl_high
        self.margin_window, self.plateau_ratio = max(3, c.margin_window), c.plateau_ratio
        self.accuracy_after, self.accuracy_band = c.accuracy_after, c.accuracy_band
        self.oscillation_window = max(4, c.oscillation_window)
        self.oscillation_sign_share, self.oscillation_amplitude = c.oscillation_sign_share, c.oscillation_amplitude
        self.eval_rise_count, self.early_stop_patience = max(1, c.eval_rise_count), c.early_stop_patience
        self.forgetting_nll_delta, self.forgetting_nll_delta_fraction = (
            c.forgetting_nll_delta,
            c.forgetting_nll_delta_fraction,
        )
        self.records_seen = 0
        self.fired: list[Diagnosis] = []  # every diagnosis returned so far, in order
        self._active: dict[str, int] = {}  # condition key -> level it last fired at
        self._stop = False
        self._series: dict[str, list[float]] = {}  # metric -> finite values, in record order
        self._first_length: dict[str, float] = {}

    @property
    def should_stop(self) -> bool:
        """True once a "stop" diagnosis has fired (NaN/Inf, or eval loss rising past `early_stop_patience`); it stays True."""
        return self._stop

    def update(self, record: dict) -> list[Diagnosis]:
        """Read one metrics record; return the diagnoses that are new with it."""
        self.records_seen += 1
        step = int(record.get("step", self.records_seen))
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "eval_loss"):
            value = _value(record, key)
            if value is not None:
                self._series.setdefault(key, []).append(value)
        findings: dict[str, Finding] = {}
        findings.update(self._non_finite(record, step))
        findings.update(self._likelihood_displacement(record, step))
        findings.update(self._length_drift(record, step))
        findings.update(self._kl_drift(record, step))
        findings.update(self._over_optimisation(record, step))
        findings.update(self._stuck_accuracy(record, step))
        findings.update(self._oscillating_loss(record, step))
        findings.update(self._eval_loss_rising(record, step))
        findings.update(self._forgetting(record, step))
        return self._new(findings)

    def _new(self, findings: dict[str, Finding]) -> list[Diagnosis]:
        new = []
        for key, finding in findings.items():
            if finding is None:
                self._active.pop(key, None)
                continue
            level, diagnosis = finding
            if level > self._active.get(key, 0):
                new.append(diagnosis)
                self._stop = self._stop or diagnosis.severity == "stop"
            # Hysteresis: a value hovering around the higher threshold must not re-fire it; only a full clear resets.
            self._active[key] = max(level, self._active.get(key, 0))
        self.fired.extend(new)
        return new

    # --- (f) NaN / Inf --------------------------------------------------------------------------

    def _non_finite(self, record: dict, step: int) -> dict[str, Finding]:
        # metrics.jsonl stores NaN/Inf as null, so a present-but-null value is non-finite too.
        watched = [key for key in ("loss", "grad_norm", "eval_loss") if key in record]
        if not watched:
            return {}
        bad = [f"{key}={record[key]}" for key in watched if _value(record, key) is None]
        if not bad:
            return {"non_finite": None}
        losses = self._series.get("loss", [])
        last_good = (
            f" (last finite loss {losses[-1]:.4f}, record {self.records_seen})"
            if losses
            else f" (record {self.records_seen})"
        )
        evidence = f"{', '.join(bad)}{last_good}: a non-finite loss or gradient norm; further steps only spread it through the weights"
        return {"non_finite": (1, Diagnosis("non_finite", step, evidence, MITIGATIONS["non_finite"], "stop"))}

    # --- (a) likelihood displacement -------------------------------------------------------------

    def _likelihood_displacement(self, record: dict, step: int) -> dict[str, Finding]:
        if _value(record, "logps/chosen") is None or _value(record, "rewards/margins") is None:
            return {}
        chosen, margins = self._series["logps/chosen"], self._series["rewards/margins"]
        n = self.smoothing
        if len(chosen) < 2 * n or len(margins) < 2 * n:
            return {}
        chosen_start, chosen_now = _mean(chosen[:n]), _mean(chosen[-n:])
        margin_start, margin_now = _mean(margins[:n]), _mean(margins[-n:])
        allowed_drop = max(self.chosen_logp_drop, self.chosen_logp_drop_fraction * abs(chosen_start))
        if not (chosen_start - chosen_now > allowed_drop and margin_now - margin_start > self.margin_rise):
            return {"likelihood_displacement": None}
        rejected = self._series.get("logps/rejected", [])
        rejected_text = (
            f", logps/rejected from {_mean(rejected[:n]):.1f} to {_mean(rejected[-n:]):.1f}"
            if len(rejected) >= 2 * n
            else ""
        )
        evidence = (
            f"logps/chosen fell from {chosen_start:.1f} to {chosen_now:.1f} nats ({chosen_now - chosen_start:+.1f}; "
            f"mean of the first and last {n} records) while rewards/margins rose from {margin_start:.2f} to "
            f"{margin_now:.2f}{rejected_text}: the chosen completion is getting less likely"
        )
        diagnosis = Diagnosis("likelihood_displacement", step, evidence, MITIGATIONS["likelihood_displacement"])
        return {"likelihood_displacement": (1, diagnosis)}

    # --- (b) completion length drift -------------------------------------------------------------

    def _length_drift(self, record: dict, step: int) -> dict[str, Finding]:
        findings: dict[str, Finding] = {}
        for key in ("mean_length", "eval_mean_length"):
            length = _value(record, key)
            if length is None:
                continue
            first = self._first_length.setdefault(key, length)
            if first <= 0:
                continue
            ratio = length / first
            grown, shrunk = ratio > self.length_growth, ratio < self.length_shrink
            evidence = f"{key} went from {first:.1f} to {length:.1f} ({ratio:.2f}x its first value)"
            findings[f"length_drift/{key}/grown"] = (
                (
                    1,
                    Diagnosis(
                        "length_drift",
                        step,
                        evidence + ": responses are getting longer (length hacking)",
                        MITIGATIONS["length_hacking"],
                    ),
                )
                if grown
                else None
            )
            findings[f"length_drift/{key}/shrunk"] = (
                (
                    1,
                    Diagnosis(
                        "length_drift",
                        step,
                        evidence + ": responses are getting shorter (truncated answers "
                        "are a symptom of catastrophic forgetting)",
                        MITIGATIONS["catastrophic_forgetting"],
                    ),
                )
                if shrunk
                else None
            )
        return findings

    # --- (c) over-optimisation -------------------------------------------------------------------

    def _kl_drift(self, record: dict, step: int) -> dict[str, Finding]:
        # Train and eval KL measure one drift: one condition, so a run does not warn twice for it.
        key = "kl/chosen" if _value(record, "kl/chosen") is not None else "eval_kl/chosen"
        kl = _value(record, key)
        if kl is None:
            return {}
        level = 2 if kl > self.kl_high else 1 if kl > self.kl_warn else 0
        if level == 0:
            return {"kl_drift": None}
        limit = self.kl_high if level == 2 else self.kl_warn
        evidence = f"{key}={kl:.2f} nats per sequence, above {limit:g}: the policy is drifting far from the reference"
        return {"kl_drift": (level, Diagnosis("kl_drift", step, evidence, MITIGATIONS["over_optimisation"]))}

    def _over_optimisation(self, record: dict, step: int) -> dict[str, Finding]:
        margins, eval_losses = self._series.get("rewards/margins", []), self._series.get("eval_loss", [])
        if "rewards/margins" not in record and "eval_loss" not in record:
            return {}
        if len(margins) < self.margin_window or len(eval_losses) < 2:
            return {}
        window = margins[-self.margin_window :]
        steps = [b - a for a, b in zip(window, window[1:])]
        half = len(steps) // 2
        first_half, second_half = _mean(steps[:half]), _mean(steps[-half:])
        growing = sum(d > 0 for d in steps) >= math.ceil(0.8 * len(steps)) and window[-1] > window[0]
        no_plateau = first_half > 0 and second_half >= self.plateau_ratio * first_half
        eval_rising = eval_losses[-1] > eval_losses[-2]
        if not (growing and no_plateau and eval_rising):
            return {"over_optimisation": None}
        evidence = (
            f"rewards/margins kept growing over the last {len(window)} records ({window[0]:.2f} -> {window[-1]:.2f}, "
            f"no plateau) while eval_loss rose ({eval_losses[-2]:.4f} -> {eval_losses[-1]:.4f}): the implicit reward "
            "keeps increasing but held-out pairs get worse (reward over-optimisation)"
        )
        return {
            "over_optimisation": (1, Diagnosis("over_optimisation", step, evidence, MITIGATIONS["over_optimisation"]))
        }

    # --- (d) not learning: accuracy stuck near chance, or an oscillating loss --------------------

    def _stuck_accuracy(self, record: dict, step: int) -> dict[str, Finding]:
        if _value(record, "rewards/accuracies") is None:
            return {}
        accuracies = self._series["rewards/accuracies"]
        if len(accuracies) < self.accuracy_after:
            return {}
        recent = _mean(accuracies[-self.smoothing :])
        if abs(recent - 0.5) > self.accuracy_band:
            return {"stuck_accuracy": None}
        evidence = (
            f"rewards/accuracies is {recent:.3f} (mean of the last {self.smoothing} records) after {len(accuracies)} "
            "records: the policy does not separate chosen from rejected better than chance"
        )
        return {"stuck_accuracy": (1, Diagnosis("stuck_accuracy", step, evidence, MITIGATIONS["stuck_accuracy"]))}

    def _oscillating_loss(self, record: dict, step: int) -> dict[str, Finding]:
        if _value(record, "loss") is None:
            return {}
        losses = self._series["loss"][-self.oscillation_window :]
        if len(losses) < self.oscillation_window:
            return {}
        diffs = [b - a for a, b in zip(losses, losses[1:])]
        flips = sum(a * b < 0 for a, b in zip(diffs, diffs[1:]))
        flip_share = flips / (len(diffs) - 1)
        amplitude = _mean([abs(d) for d in diffs])
        third = len(losses) // 3
        progress = _mean(losses[:third]) - _mean(
            losses[-third:]
        )  # a falling loss may be noisy; only a stalled one counts
        if flip_share < self.oscillation_sign_share or amplitude < self.oscillation_amplitude or progress > amplitude:
            return {"oscillating_loss": None}
        evidence = (
            f"over the last {len(losses)} records the loss changed direction {flips} of {len(diffs) - 1} times, "
            f"by {amplitude:.3f} nats on average (range {min(losses):.3f}-{max(losses):.3f}) with no net progress: "
            "the pairs pull the policy in contradictory directions, a symptom of label noise (or of too few pairs "
            "per logged record: raise train.logging_steps to average over more)"
        )
        return {"oscillating_loss": (1, Diagnosis("oscillating_loss", step, evidence, MITIGATIONS["label_noise"]))}

    # --- (e) eval loss rising --------------------------------------------------------------------

    def _eval_loss_rising(self, record: dict, step: int) -> dict[str, Finding]:
        if _value(record, "eval_loss") is None:
            return {}
        losses = self._series["eval_loss"]
        rises = 0
        while rises + 1 < len(losses) and losses[-1 - rises] > losses[-2 - rises]:
            rises += 1
        if rises < self.eval_rise_count:
            return {"eval_loss_rising": None}
        recent = " -> ".join(f"{value:.4f}" for value in losses[-rises - 1 :])
        patience = self.early_stop_patience
        if patience is not None and rises > patience:
            evidence = f"eval_loss rose at {rises} consecutive evaluations ({recent}), more than early_stop_patience={patience}: stop here"
            return {
                "eval_loss_rising": (
                    2,
                    Diagnosis("eval_loss_rising", step, evidence, MITIGATIONS["over_optimisation"], "stop"),
                )
            }
        hint = f"; training stops after more than {patience}" if patience is not None else ""
        evidence = f"eval_loss rose at {rises} consecutive evaluations ({recent}){hint}"
        return {
            "eval_loss_rising": (1, Diagnosis("eval_loss_rising", step, evidence, MITIGATIONS["over_optimisation"]))
        }

    # --- (g) forgetting: the retention set's NLL rises above the reference's ------------------------

    def _forgetting(self, record: dict, step: int) -> dict[str, Finding]:
        delta, ref = _value(record, "retention/nll_delta"), _value(record, "retention/nll_ref")
        if delta is None or ref is None:
            return {}
        # Both limits must be passed: an absolute one (nats per token) and one relative to what the reference scores.
        limit = max(self.forgetting_nll_delta, self.forgetting_nll_delta_fraction * ref)
        if delta <= limit:
            return {"forgetting": None}
        evidence = (
            f"retention/nll_delta={delta:.3f} nats per token (policy {ref + delta:.3f} vs reference {ref:.3f}, "
            f"{100 * delta / ref if ref > 0 else float('inf'):.0f}% higher), above {limit:.3f}: the policy is forgetting "
            "the retention text (data.retention_path)"
        )
        return {"forgetting": (1, Diagnosis("forgetting", step, evidence, MITIGATIONS["forgetting"]))}


def replay(records: Iterable[dict], **thresholds) -> list[Diagnosis]:
    """Every diagnosis a finished run's records (e.g. `read_metrics("runs/x/metrics.jsonl")`) would have raised."""
    detectors = FailureDetectors(**thresholds)
    for record in records:
        detectors.update(record)
    return list(detectors.fired)
