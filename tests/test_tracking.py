"""Tracking through Accelerate's trackers, and eval-time sampling for the length detector.

TensorBoard is exercised for real (event files are read back) when it is
installed; W&B and MLflow are only checked for the error a user gets when they
are requested but missing. The trainer-level test runs once config.py has
`train.report_to` and `train.eval_generate` and trainer.py calls dpokit.training.tracking.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dpokit
from dpokit.training import tracking
from dpokit.config import ConfigError, load_config
from dpokit.data.tokenization import TokenizedPair
from dpokit.detectors import Diagnosis
from dpokit.training.eval_generation import eval_prompts, generation_metrics
from dpokit.generation import sample
from dpokit.training.metrics import read_metrics
from dpokit.tiny import build_tiny_llama
from report_histories import healthy_records
from tiny_assets import synthetic_pairs, tiny_model_dir, word_tokenizer, write_jsonl


def cfg_with(tmp_path: Path, report_to: list[str]):
    return load_config({"out_dir": str(tmp_path / "run"), "train": {"report_to": report_to}})


# --- configuration ----------------------------------------------------------------------------


def test_no_trackers_means_a_plain_accelerator(tmp_path):
    assert tracking.accelerator_kwargs(cfg_with(tmp_path, [])) == {}
    assert tracking.accelerator_kwargs(load_config({})) == {}  # the default


def test_unknown_tracker_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.report_to.*'tensorbord'.*tensorboard, wandb, mlflow"):
        tracking.accelerator_kwargs(cfg_with(tmp_path, ["tensorbord"]))


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_requested_but_not_installed_says_how_to_install(tmp_path, monkeypatch, name):
    monkeypatch.setattr(tracking, "_available", lambda n: n != name)
    with pytest.raises(ConfigError, match=rf"asks for {name} but it is not installed \(pip install {name}\)"):
        tracking.accelerator_kwargs(cfg_with(tmp_path, ["tensorboard", "wandb", "mlflow"]))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_the_real_availability_check_refuses_a_missing_wandb(tmp_path):
    with pytest.raises(ConfigError, match="pip install wandb"):
        tracking.accelerator_kwargs(cfg_with(tmp_path, ["wandb"]))


def test_flat_config_is_scalar_and_has_no_secrets():
    nested = {
        "model": {"name_or_path": "m", "hf_token": "hf_abc", "revision": None},
        "data": {"columns": {"prompt": "q"}, "max_new_tokens": 64},
        "loss": {"type": ["sigmoid", "sft"], "beta": 0.1},
        "api_key": "k",
        "out_dir": "runs/x",
    }
    flat = tracking.flat_config(SimpleNamespace(to_dict=lambda: nested))
    assert flat == {
        "model.name_or_path": "m",
        "model.revision": "null",
        "data.columns.prompt": "q",
        "data.max_new_tokens": 64,
        "loss.type": '["sigmoid", "sft"]',
        "loss.beta": 0.1,
        "out_dir": "runs/x",
    }
    real = tracking.flat_config(load_config({}))
    assert real["loss.beta"] == 0.1 and all(isinstance(v, (int, float, str, bool)) for v in real.values())


def test_numeric_metrics_keep_numbers_only():
    record = {"step": 5, "loss": 0.5, "eval_loss": None, "epoch": 1, "note": "x", "flag": True, "nan": float("nan")}
    values = tracking.numeric_metrics(record)
    assert set(values) == {"loss", "epoch", "nan"} and values["epoch"] == 1.0


# --- TensorBoard, for real --------------------------------------------------------------------


def read_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], set[str]]:
    """Scalars (tag -> [(step, value)]) and text tags of every event file under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    texts: set[str] = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        texts |= {tag for tag in acc.Tags()["tensors"] if tag.startswith("diagnosis/")}
    return scalars, texts


def test_tensorboard_gets_every_record_and_the_diagnoses(tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator

    cfg = cfg_with(tmp_path, ["tensorboard"])
    kwargs = tracking.accelerator_kwargs(cfg)
    assert kwargs["log_with"] == ["tensorboard"]
    assert kwargs["project_config"].logging_dir == str(tmp_path / "run" / "tensorboard")
    accelerator = Accelerator(cpu=True, **kwargs)
    tracking.init_trackers(accelerator, cfg)
    records = healthy_records(20, 2, 10)
    for record in records:
        tracking.log_metrics(accelerator, record, record["step"])
    tracking.log_diagnosis(accelerator, Diagnosis("kl_drift", 12, "kl/chosen=6.1", "raise beta"))
    tracking.end_trackers(accelerator)
    assert accelerator.trackers == []

    scalars, texts = read_events(tmp_path / "run" / "tensorboard")
    assert {"loss", "rewards/margins", "kl/chosen", "learning_rate", "eval_loss", "eval_rewards/accuracies"} <= set(
        scalars
    )
    assert "step" not in scalars
    assert [step for step, _ in scalars["loss"]] == list(range(2, 21, 2))
    assert [step for step, _ in scalars["eval_loss"]] == [10, 20]
    assert scalars["loss"][0][1] == pytest.approx(records[0]["loss"], rel=1e-6)
    assert texts == {"diagnosis/kl_drift/text_summary"}  # add_text stores the text under this tag


def test_without_trackers_logging_is_a_no_op():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert tracking.log_metrics(accelerator, {"step": 1, "loss": 0.5}, 1) == {}
    tracking.log_diagnosis(accelerator, Diagnosis("kl_drift", 1, "e", "m"))
    tracking.end_trackers(accelerator)


# --- eval-time sampling -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    tokenizer = word_tokenizer()
    return build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0), tokenizer


def test_eval_prompts_are_the_first_distinct_prompts_and_round_trip(tiny):
    _, tokenizer = tiny
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [
        TokenizedPair(ids(p), ids("good"), ids("bad")) for p in ("the film", "the film", "it was", "a movie", "hi")
    ]
    prompts = eval_prompts(pairs, tokenizer, 3)
    assert prompts == ["the film", "it was", "a movie"]
    assert [ids(p) for p in prompts] == [pairs[0].prompt_ids, pairs[2].prompt_ids, pairs[3].prompt_ids]


def test_generation_metrics_measure_the_samples(tiny):
    model, tokenizer = tiny
    model.train()
    prompts = ["the film was", "it is", "tell me a story"]
    metrics = generation_metrics(model, tokenizer, prompts, n=5, seed=3, max_new_tokens=8)
    assert model.training, "sampling must hand the model back in training mode"
    # the same samples, drawn directly: prompts cycled to n, one completion each, EOS not counted
    samples = sample(model, tokenizer, prompts + prompts[:2], num_samples=1, temperature=1.0, max_new_tokens=8, seed=3)
    lengths = [len(s.completion_ids) - int(s.finished) for s in samples]
    assert metrics["eval_mean_length"] == pytest.approx(sum(lengths) / 5)
    assert metrics["eval_finished_share"] == pytest.approx(sum(s.finished for s in samples) / 5)
    assert 0 <= metrics["eval_mean_length"] <= 8
    assert generation_metrics(model, tokenizer, prompts, n=5, seed=3, max_new_tokens=8) == metrics  # fixed seed
    assert generation_metrics(model, tokenizer, prompts, n=0, seed=3) == {}
    assert generation_metrics(model, tokenizer, [], n=4, seed=3) == {}


def test_generation_metrics_see_a_policy_that_stops_at_once(tiny):
    model, tokenizer = tiny

    def always_eos(module, inputs, logits):
        logits = torch.full_like(logits, -1e4)
        logits[..., tokenizer.eos_token_id] = 0.0
        return logits

    handle = model.lm_head.register_forward_hook(always_eos)
    try:
        metrics = generation_metrics(model, tokenizer, ["the film was"], n=4, seed=0, max_new_tokens=8)
    finally:
        handle.remove()
    assert metrics == {"eval_mean_length": 0.0, "eval_finished_share": 1.0}


# --- in the trainer ---------------------------------------------------------------------------


@pytest.mark.slow
def test_training_logs_to_tensorboard_and_samples_lengths(tmp_path):
    pytest.importorskip("tensorboard")
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(64, seed=1))
    held_out = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(16, seed=2))
    result = dpokit.train(
        {
            "model": {"name_or_path": str(tiny_model_dir())},
            "data": {"path": str(train), "eval_path": str(held_out), "max_length": 32, "max_prompt_length": 16},
            "loss": {"beta": 0.5},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {
                "batch_size": 8,
                "max_steps": 8,
                "logging_steps": 2,
                "eval_steps": 4,
                "progress_bar": False,
                "report_to": ["tensorboard"],
                "eval_generate": 6,
            },
            "out_dir": str(tmp_path / "run"),
        }
    )
    records = read_metrics(result.run_dir / "metrics.jsonl")
    lengths = [(r["step"], r["eval_mean_length"]) for r in records if "eval_mean_length" in r]
    assert [step for step, _ in lengths] == [0, 4, 8]  # the reference's baseline, then every evaluation
    assert all(0 <= value <= 16 for _, value in lengths)
    scalars, _ = read_events(result.run_dir / "tensorboard")
    assert [step for step, _ in scalars["loss"]] == [2, 4, 6, 8]
    assert {"eval_loss", "eval_mean_length", "grad_norm"} <= set(scalars)
