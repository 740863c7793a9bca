"""The eval split holds out whole prompts (issue 15.16), and data.path must be a regular file (15.6)."""

import os

import pytest

from dpokit.config import load_config
from dpokit.data.loading import read_rows
from dpokit.data.prepare import format_summary, prepare_data
from dpokit.data.records import DataError
from dpokit.data.unpaired import prepare_unpaired
from dpokit.data.sft import prepare_sft
from tiny_assets import word_tokenizer, write_jsonl

SUBJECTS = "film movie plot acting sky story time colour hi hello".split()


def _several_pairs_per_prompt() -> list[dict]:
    """10 prompts with 4 pairs each: a row-level split all but surely puts some prompt on both sides."""
    return [
        {"prompt": f"the {subject} was", "chosen": f" good {tail}", "rejected": f" bad {tail}"}
        for subject in SUBJECTS
        for tail in ("fine", "very", "plot", "acting")
    ]


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_no_prompt_is_in_both_train_and_eval(tmp_path, seed):
    path = write_jsonl(tmp_path / "d.jsonl", _several_pairs_per_prompt())
    cfg = load_config({"data": {"path": str(path), "eval_fraction": 0.25, "max_length": 32}, "train": {"seed": seed}})
    data = prepare_data(cfg, word_tokenizer())
    decode = word_tokenizer().decode
    train_prompts = {decode(p.prompt_ids) for p in data.train}
    eval_prompts = {decode(p.prompt_ids) for p in data.eval}
    assert eval_prompts and not train_prompts & eval_prompts
    assert len(data.eval) == 4 * len(eval_prompts) and len(data.eval) >= 10  # whole prompts, at least the fraction
    summary = data.summary
    assert summary["train"]["prompts"] + summary["eval"]["prompts"] == 10
    assert summary["train"]["held_out"] == len(data.eval) == summary["eval"]["rows_used"]
    assert f"({summary['eval']['prompts']} prompts)" in format_summary(summary)


@pytest.mark.parametrize("prepare", [prepare_unpaired, prepare_sft], ids=["kto", "sft"])
def test_the_unpaired_and_sft_splits_hold_out_whole_prompts_too(tmp_path, prepare):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in _several_pairs_per_prompt()]
    cfg = load_config(
        {
            "data": {"path": str(write_jsonl(tmp_path / "d.jsonl", rows)), "eval_fraction": 0.25, "max_length": 32},
            "loss": {"type": "kto"},
        }
    )
    data = prepare(cfg, word_tokenizer())
    decode = word_tokenizer().decode
    assert data.eval and not {decode(e.prompt_ids) for e in data.train} & {decode(e.prompt_ids) for e in data.eval}


def test_one_prompt_only_cannot_be_split_and_says_so(tmp_path):
    rows = [{"prompt": "the film", "chosen": f" good {t}", "rejected": " bad"} for t in ("fine", "very", "plot")]
    cfg = load_config({"data": {"path": str(write_jsonl(tmp_path / "d.jsonl", rows)), "eval_fraction": 0.3}})
    with pytest.raises(DataError, match="share one prompt; give a separate data.eval_path"):
        prepare_data(cfg, word_tokenizer())


def test_a_fifo_or_device_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(DataError, match="not a regular file") as error:
            read_rows(path)
        assert "not found" not in str(error.value)
