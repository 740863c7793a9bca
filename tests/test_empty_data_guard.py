"""Issue 16: a run whose first optimizer steps train on no completion token (or get no gradient) stops at once.

End to end, every label of every batch is IGNORE_INDEX (what a tokenizer that does not match the
model, or a template that swallows the answers, leaves): the loss is log 2 at every step and every
gradient exactly 0.0. `dpokit train` must stop after three steps with one line naming the tokenizer
class, and exit 2, instead of "training" to the end.
"""

from __future__ import annotations

import pytest
import yaml

import dpokit.training.loop
from dpokit.cli import main as cli_main
from dpokit.data.collate import IGNORE_INDEX
from dpokit.steps import PairedStep
from dpokit.training.empty_data import FIRST_STEPS, EmptyDataGuard
from dpokit.training.metrics import read_metrics
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl


def test_three_empty_steps_stop_with_the_tokenizer_named():
    guard = EmptyDataGuard("Qwen2Tokenizer")
    assert FIRST_STEPS == 3
    assert guard.update(1, 0, 0.0) is None and guard.update(2, 0, 0.0) is None
    message = guard.update(3, 0, 0.0)
    assert message.startswith("3 steps with grad_norm 0.0 and 0 completion tokens: the data tokenised to nothing")
    assert "check the tokenizer (Qwen2Tokenizer) matches the model" in message


def test_zero_gradients_with_tokens_also_stop_and_say_what_was_seen():
    guard = EmptyDataGuard("GPT2TokenizerFast")
    assert [guard.update(s, 12, 0.0) for s in (1, 2)] == [None, None]
    assert "3 steps with grad_norm 0.0 (completion tokens: 12, 12, 12)" in guard.update(3, 12, 0.0)


@pytest.mark.parametrize("steps", [[(0, 0.0), (40, 0.7), (0, 0.0)], [(30, 0.5)] * 3, [(0, 0.0), (0, 0.0)]])
def test_one_step_that_learns_or_fewer_than_three_steps_do_not_stop(steps):
    guard = EmptyDataGuard("Qwen2Tokenizer")
    assert all(guard.update(i + 1, t, g) is None for i, (t, g) in enumerate(steps))


def test_a_run_resumed_past_its_first_step_is_not_watched():
    guard = EmptyDataGuard("Qwen2Tokenizer")
    assert guard.update(3, 0, 0.0) is None and not guard.watching(3)


class _MaskedStep(PairedStep):
    """The plain paired step with every label masked: no completion token is scored."""

    def collate(self, pairs, pad_token_id):
        batch = super().collate(pairs, pad_token_id)
        batch["labels"].fill_(IGNORE_INDEX)
        return batch


@pytest.mark.slow
def test_dpokit_train_on_data_that_tokenised_to_nothing_exits_2_after_three_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dpokit.training.loop, "step_for", lambda cfg: _MaskedStep())
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32, seed=1))
    config = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16, "eval_fraction": 0.0},
        "speed": {"packing": False, "prefix_sharing": False, "chunked_logps": False},
        "train": {"batch_size": 8, "max_steps": 8, "logging_steps": 1, "save_steps": 0, "progress_bar": False},
        "out_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpokit: error:")]
    assert len(errors) == 1
    assert "3 steps with grad_norm 0.0 and 0 completion tokens: the data tokenised to nothing" in errors[0]
    assert "check the tokenizer (" in errors[0]
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]  # the three steps are logged, then the run stops
    assert not (tmp_path / "run" / "final").exists()
