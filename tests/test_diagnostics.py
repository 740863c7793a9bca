"""Failure detectors: each mode fires on a history crafted to show it, once, and a healthy run fires none."""

import math

import pytest

from dpokit.detectors import Diagnosis, FailureDetectors, replay
from dpokit.mitigations import MITIGATIONS
from dpokit.training.metrics import MetricsLog, read_metrics


def healthy_history(n: int = 40, eval_every: int = 5) -> list[dict]:
    """Loss falling smoothly, margins growing then plateauing, accuracy rising, small KL, chosen log-probs stable."""
    records = []
    for i in range(n):
        step = 10 * (i + 1)
        margin = 2.0 * (1 - math.exp(-i / 6))
        records.append({
            "step": step, "loss": 0.2 + 0.49 * math.exp(-i / 8), "rewards/margins": margin,
            "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2,
            "rewards/accuracies": 0.5 + 0.4 * (1 - math.exp(-i / 5)), "logps/chosen": -50.0 - 0.5 * math.sin(i),
            "logps/rejected": -52.0 - margin * 5, "kl/chosen": 0.05 * i, "grad_norm": 1.0 + 0.1 * math.cos(i),
            "mean_length": 40.0 + math.sin(i),
        })  # fmt: skip
        if (i + 1) % eval_every == 0:
            records.append({"step": step, "eval_loss": 0.3 + 0.4 * math.exp(-i / 10), "eval_rewards/accuracies": 0.8})
    return records


def _train(i: int, **values) -> dict:
    """A training record with healthy defaults, `values` overriding them."""
    return {"step": i, "loss": 0.5, "rewards/margins": 1.0, "rewards/accuracies": 0.8, "logps/chosen": -50.0,
            "grad_norm": 1.0, "kl/chosen": 0.5, **values}  # fmt: skip


def _run(records, **thresholds) -> tuple[FailureDetectors, list[Diagnosis]]:
    detectors = FailureDetectors(**thresholds)
    fired = [d for record in records for d in detectors.update(record)]
    return detectors, fired


def _modes(diagnoses) -> list[str]:
    return [d.mode for d in diagnoses]


def test_healthy_run_raises_nothing():
    detectors, fired = _run(healthy_history(), early_stop_patience=2)
    assert fired == [] and not detectors.should_stop


def test_likelihood_displacement_chosen_falls_while_margins_grow():
    records = [_train(i, **{"logps/chosen": -50.0 - 3 * i, "logps/rejected": -50.0 - 6 * i, "rewards/margins": 0.2 * i})
               for i in range(12)]  # fmt: skip
    _, fired = _run(records)
    assert _modes(fired) == ["likelihood_displacement"]  # once, although it keeps getting worse
    (diagnosis,) = fired
    assert diagnosis.step == 6 and "logps/chosen fell from -53.0 to -65.0" in diagnosis.evidence
    assert "rewards/margins rose" in diagnosis.evidence and "loss.type=[sigmoid, sft]" in diagnosis.mitigation


def test_displacement_threshold_scales_with_long_completions():
    def history(drop_per_record):
        return [
            _train(i, **{"logps/chosen": -300.0 - drop_per_record * i, "rewards/margins": 0.2 * i}) for i in range(12)
        ]

    assert _run(history(2.0))[1] == []  # -20 nats of -300: within batch noise of long completions
    assert _modes(_run(history(5.0))[1]) == ["likelihood_displacement"]  # -45 nats: more than 10% of the start


def test_chosen_falling_with_flat_margins_is_not_displacement():
    _, fired = _run([_train(i, **{"logps/chosen": -50.0 - 3 * i}) for i in range(12)])
    assert fired == []


@pytest.mark.parametrize("final, words", [(160.0, "longer"), (30.0, "shorter")])
def test_completion_length_drift(final, words):
    lengths = [100.0, 105.0, 120.0, final, final]
    _, fired = _run([{"step": i, "eval_mean_length": length} for i, length in enumerate(lengths)])
    assert _modes(fired) == ["length_drift"] and fired[0].step == 3
    assert words in fired[0].evidence and f"to {final:.1f}" in fired[0].evidence
    guide = MITIGATIONS["length_hacking"] if words == "longer" else MITIGATIONS["catastrophic_forgetting"]
    assert fired[0].mitigation == guide


def test_kl_warns_above_5_then_above_10_and_again_after_it_clears():
    kls = [1.0, 6.0, 7.0, 12.0, 13.0, 2.0, 7.0]
    _, fired = _run([_train(i, **{"kl/chosen": kl}) for i, kl in enumerate(kls)])
    assert [(d.mode, d.step) for d in fired] == [("kl_drift", 1), ("kl_drift", 3), ("kl_drift", 6)]
    assert "above 5" in fired[0].evidence and "above 10" in fired[1].evidence
    assert "Increase loss.beta" in fired[0].mitigation


def test_margins_growing_without_plateau_while_eval_loss_rises():
    records = []
    for i in range(10):
        records.append(_train(i, **{"rewards/margins": 0.5 * i}))
        if i % 3 == 2:
            records.append({"step": i, "eval_loss": 0.40 + 0.02 * i})
    _, fired = _run(records)
    assert "over_optimisation" in _modes(fired)
    assert "eval_loss rose" in next(d for d in fired if d.mode == "over_optimisation").evidence


def test_margins_that_plateau_are_not_over_optimisation():
    records = []
    for i in range(10):
        records.append(_train(i, **{"rewards/margins": 3 * (1 - math.exp(-i / 1.5))}))
        if i % 3 == 2:
            records.append({"step": i, "eval_loss": 0.40 + 0.001 * i})
    _, fired = _run(records)
    assert "over_optimisation" not in _modes(fired)


def test_accuracy_stuck_at_chance_after_n_records():
    _, fired = _run([_train(i, **{"rewards/accuracies": 0.5 + 0.02 * (-1) ** i}) for i in range(30)], accuracy_after=20)
    assert _modes(fired) == ["stuck_accuracy"] and fired[0].step == 19
    assert "label_smoothing=0.1" in fired[0].mitigation


def test_oscillating_loss_hints_at_label_noise():
    _, fired = _run([_train(i, loss=0.45 + 0.2 * (i % 2)) for i in range(30)])
    assert _modes(fired) == ["oscillating_loss"] and fired[0].step == 19
    assert "changed direction 18 of 18 times" in fired[0].evidence
    assert fired[0].mitigation == MITIGATIONS["label_noise"]


def test_small_jitter_or_a_falling_loss_is_not_oscillation():
    assert _run([_train(i, loss=0.45 + 0.02 * (i % 2)) for i in range(30)])[1] == []
    assert _run([_train(i, loss=0.69 - 0.02 * i + 0.1 * (i % 2)) for i in range(30)])[1] == []  # swings, but learning


def test_eval_loss_rising_warns_then_stops_past_patience():
    detectors = FailureDetectors(eval_rise_count=2, early_stop_patience=2)
    answers = [
        detectors.update({"step": s, "eval_loss": loss}) for s, loss in enumerate([0.6, 0.5, 0.55, 0.58, 0.6, 0.61])
    ]
    assert [[d.severity for d in a] for a in answers] == [[], [], [], ["warn"], ["stop"], []]
    assert detectors.should_stop and "more than early_stop_patience=2" in answers[4][0].evidence


def test_eval_loss_rising_without_patience_never_stops():
    detectors, fired = _run([{"step": s, "eval_loss": 0.5 + 0.01 * s} for s in range(8)])
    assert _modes(fired) == ["eval_loss_rising"] and not detectors.should_stop


@pytest.mark.parametrize("bad", [{"loss": float("nan")}, {"grad_norm": float("inf")}, {"loss": None}])
def test_non_finite_loss_or_grad_norm_stops(bad):
    detectors, fired = _run([_train(0), _train(1, **bad), _train(2)])
    assert [(d.mode, d.severity, d.step) for d in fired] == [("non_finite", "stop", 1)]
    assert detectors.should_stop  # latched: the next finite record does not undo it


def test_nan_written_to_metrics_jsonl_is_caught_on_replay(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for record in [_train(1), _train(2, loss=float("nan"))]:
        log.write(record)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[1]["loss"] is None  # how metrics.jsonl stores NaN
    assert _modes(replay(records)) == ["non_finite"]


def test_kl_hovering_around_a_threshold_fires_each_level_once():
    kls = [6.0, 11.0, 9.0, 10.5, 9.5, 12.0]
    _, fired = _run(
        [_train(i, **{"kl/chosen": kl}) for i, kl in enumerate(kls)] + [{"step": 9, "eval_kl/chosen": 11.0}]
    )
    assert [d.step for d in fired] == [0, 1]


def test_eval_records_do_not_clear_training_conditions():
    records = [_train(0, **{"kl/chosen": 6.0}), {"step": 0, "eval_loss": 0.5}, _train(1, **{"kl/chosen": 6.5})]
    _, fired = _run(records)
    assert _modes(fired) == ["kl_drift"]


def test_thresholds_are_constructor_arguments():
    assert _modes(_run([_train(0, **{"kl/chosen": 2.0})], kl_warn=1.0)[1]) == ["kl_drift"]
    assert _run([_train(0, **{"kl/chosen": 6.0})], kl_warn=8.0, kl_high=20.0)[1] == []


def test_every_diagnosis_has_numbers_and_the_guides_advice():
    crafted = (
        [_train(i, **{"logps/chosen": -50.0 - 3 * i, "rewards/margins": 0.2 * i, "kl/chosen": 2.0 * i}) for i in range(12)]
        + [{"step": 20 + s, "eval_loss": 0.5 + 0.01 * s, "eval_mean_length": 10.0 * (s + 1)} for s in range(4)]
        + [_train(30, grad_norm=float("nan"))]
    )  # fmt: skip
    fired = replay(crafted)
    assert set(_modes(fired)) >= {
        "likelihood_displacement",
        "kl_drift",
        "eval_loss_rising",
        "length_drift",
        "non_finite",
    }
    for diagnosis in fired:
        assert any(ch.isdigit() for ch in diagnosis.evidence) and diagnosis.mitigation
        assert diagnosis.severity in ("warn", "stop") and str(diagnosis).startswith("[dpokit]")
