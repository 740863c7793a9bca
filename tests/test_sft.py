"""SFT as a Step: row layouts, completion-only labels, the token-mean loss, and learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dpokit.config import load_config
from dpokit.data.records import DataError
from dpokit.logprobs import IGNORE_INDEX
from dpokit.data.sft import load_sft, prepare_sft
from dpokit.steps.base import StepContext
from dpokit.steps import FastSFTStep, SFTStep, step_for
from dpokit.steps.sft import collate_sft, count_tokens, example_tokens, forward_sft

from dpokit.training.loop import accumulate_gradients
from dpokit.training.step_runner import StepJob
from tiny_assets import assistant, synthetic_pairs, tiny_model_dir, user, vocab_ids, word_tokenizer, write_jsonl

SFT = SFTStep()


def load(tmp_path, rows, **options):
    examples, report = load_sft(str(write_jsonl(tmp_path / "d.jsonl", rows)), **options)
    return [(e.prompt, e.completion) for e in examples], report


# --- rows ----------------------------------------------------------------------------------------


def test_prompt_completion_text_and_conversational(tmp_path):
    rows = [
        {"prompt": "the film", "completion": " good"},
        {"prompt": [user("hi")], "completion": [assistant("hello")]},
        {"prompt": "it is", "completion": " bad", "label": False},  # undesirable: never imitated
        {"prompt": "it is", "completion": " fine", "label": "true"},
        {"prompt": "it is", "completion": "   "},
    ]
    examples, report = load(tmp_path, rows)
    assert examples == [("the film", " good"), ([user("hi")], [assistant("hello")]), ("it is", " fine")]
    assert report.rows_read == 5 and report.rows_used == 3
    assert set(report.skipped) == {
        "label is false: an undesirable completion is not imitated",
        "completion is empty or whitespace-only",
    }


def test_messages_last_assistant_turn_is_the_completion(tmp_path):
    rows = [
        {"messages": [user("hi"), assistant("hello"), user("how are you"), assistant("fine thanks")]},
        {"messages": [user("hi")]},
    ]
    examples, report = load(tmp_path, rows)
    assert examples == [([user("hi"), assistant("hello"), user("how are you")], [assistant("fine thanks")])]
    assert report.layouts == {"messages": 1} and sum(report.skipped.values()) == 1


def test_paired_data_gives_its_chosen_side(tmp_path):
    rows = [
        {"prompt": "the film", "chosen": " good", "rejected": " bad"},
        {"instruction": "tell me story", "chosen": "once", "rejected": "no"},
    ]
    examples, report = load(tmp_path, rows)
    assert examples == [("the film", " good"), ([user("tell me story")], [assistant("once")])]
    assert report.layouts == {"prompt_chosen_rejected (chosen side)": 1, "alpaca (chosen side)": 1}


def test_columns_and_errors(tmp_path):
    examples, _ = load(tmp_path, [{"q": "the film", "a": " good"}], columns={"prompt": "q", "completion": "a"})
    assert examples == [("the film", " good")]
    with pytest.raises(DataError, match="no usable rows"):
        load(tmp_path, [{"text": "x"}], layout="prompt_completion")
    with pytest.raises(DataError, match="unknown layout"):
        load(tmp_path, [{"prompt": "x", "completion": "y"}], layout="nope")


# --- tokens and the loss -------------------------------------------------------------------------


def _cfg(path, **data):
    return load_config({"model": {"name_or_path": str(tiny_model_dir())}, "data": {"path": str(path), **data}})


def test_prepare_masks_the_prompt_and_appends_eos(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "the film was", "completion": " very good"},
            {"prompt": [user("hi")], "completion": [assistant("hello")]},
        ],
    )
    data = prepare_sft(_cfg(path), word_tokenizer())
    text, chat = data.train
    assert text.prompt_ids == vocab_ids("the film was") and text.completion_ids == vocab_ids("very good <|im_end|>")
    assert chat.prompt_ids == vocab_ids("<|im_start|> user hi <|im_end|> <|im_start|> assistant")
    assert chat.completion_ids == vocab_ids("hello <|im_end|>")
    assert data.summary["train"]["pairs"] == 2 and set(data.summary["train"]["token_lengths"]) == {
        "prompt",
        "completion",
    }
    batch = collate_sft(data.train, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + vocab_ids("very good <|im_end|>") + [IGNORE_INDEX] * 2
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 2
    assert count_tokens(batch) == 3 + 2 == sum(example_tokens(e) for e in data.train)


def test_eval_fraction_and_truncation(tmp_path):
    subjects = (
        "film movie plot acting sky story time colour hi hello".split()
    )  # ten prompts: eval holds out whole prompts
    rows = [{"prompt": f"the {subject} was", "completion": " very good and fine"} for subject in subjects]
    data = prepare_sft(
        _cfg(write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.2, max_length=5, max_prompt_length=2),
        word_tokenizer(),
    )
    assert len(data.train) == 8 and len(data.eval) == 2
    assert all(
        len(e.prompt_ids) == 2 and len(e.completion_ids) == 3 for e in data.train
    )  # prompt cut left, completion right
    assert data.summary["train"]["truncated"]["prompt"] == 8


def test_loss_is_the_token_mean_nll_of_the_completion(tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [
        {"prompt": "the film was", "completion": " very good"},
        {"prompt": "it is", "completion": " bad and awful plot"},
    ]
    data = prepare_sft(_cfg(write_jsonl(tmp_path / "d.jsonl", rows)), word_tokenizer())
    batch = collate_sft(data.train, pad_token_id=word_tokenizer().pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    out, metrics = forward_sft(model, None, batch, None, False)
    # HF's own causal-LM loss with the same labels is the mean NLL over the labelled tokens
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert (out.losses.sum() / count_tokens(batch)).item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"].mean().item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"].numel() == count_tokens(batch) == 3 + 5
    assert "num_tokens" not in metrics  # the trainer logs TRL's running count (test_sft_through_the_trainer)
    assert 0.0 <= metrics["mean_token_accuracy"].mean().item() <= 1.0


def test_gradient_is_independent_of_micro_batching(tmp_path):
    """batch 4 x accumulation 1 and batch 1 x accumulation 4: the same token-mean gradient."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from dpokit.training.metrics import MetricSums

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in synthetic_pairs(4, seed=3)]
    cfg = _cfg(write_jsonl(tmp_path / "d.jsonl", rows))
    data = prepare_sft(cfg, word_tokenizer())
    assert len({len(e.completion_ids) for e in data.train}) > 1  # unequal lengths: a per-example mean would differ
    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    grads = []
    for micro in ([data.train], [[e] for e in data.train]):
        policy = copy.deepcopy(model)
        accumulate_gradients(
            StepJob(policy, None, SFT, StepContext(cfg, False, group=accelerator)),
            [collate_sft(m, 0) for m in micro],
            MetricSums(),
        )
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.slow
def test_a_local_loop_learns_the_completions_not_the_prompts(tmp_path):
    """The Task alone (prepare, collate, forward) in a plain loop: the completion NLL falls, the prompt is untouched."""
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in synthetic_pairs(32, seed=0)]
    data = prepare_sft(_cfg(write_jsonl(tmp_path / "d.jsonl", rows)), word_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = SFT.collate(data.train, word_tokenizer().pad_token_id)
    first = None
    for _ in range(30):
        out, metrics = SFT.forward(model, None, batch, StepContext(None, False))
        (out.losses.sum() / SFT.count(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else metrics["loss"].mean().item()
    last = metrics["loss"].mean().item()
    assert last < 0.5 * first and metrics["mean_token_accuracy"].mean().item() > 0.5
    # " good" is the first completion word after every prompt: the model now predicts it
    good = word_tokenizer().get_vocab()["good"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([data.train[0].prompt_ids])).logits[0, -1]
    assert logits.argmax().item() == good


@pytest.mark.slow
def test_sft_through_the_trainer(tmp_path, monkeypatch):
    import dpokit.training.setup as tasks
    import dpokit.training.loop as trainer
    from dpokit.training.metrics import read_metrics

    made = []
    real = tasks.make_reference
    monkeypatch.setattr(
        tasks, "make_reference", lambda policy, cfg, needed: made.append(needed) or real(policy, cfg, needed)
    )
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in synthetic_pairs(64, seed=0)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    result = trainer.train(
        {
            "model": {"name_or_path": str(tiny_model_dir())},
            "data": {"path": str(path), "eval_fraction": 0.25},
            "optim": {"lr": 3e-3},
            "train": {"task": "sft", "batch_size": 8, "max_steps": 30, "logging_steps": 10, "progress_bar": True},
            "out_dir": str(tmp_path / "run"),
        }
    )
    assert made == [False]  # no reference model for SFT
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert {"loss", "mean_token_accuracy", "num_tokens", "grad_norm", "learning_rate"} <= set(records[0])
    assert 0 < records[0]["num_tokens"] < records[1]["num_tokens"] < records[2]["num_tokens"]  # a running total
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert result.metrics["eval_loss"] < records[0]["loss"] and math.isfinite(
        result.metrics["eval_mean_token_accuracy"]
    )
    assert (result.model_dir / "config.json").exists() and (result.run_dir / "data_summary.json").exists()


def test_cli_sft_verb(tmp_path, capsys):
    from dpokit.cli import main

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in synthetic_pairs(8, seed=0)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model:\n  name_or_path: {tiny_model_dir()}\ndata:\n  path: {path}\ntrain:\n  max_steps: 2\n  progress_bar: false\n"
    )
    assert main(["sft", str(config), f"out_dir={tmp_path / 'run'}"]) == 0
    assert "mean_token_accuracy=" in capsys.readouterr().out
    assert load_config(str(tmp_path / "run" / "config.yaml")).train.task == "sft"


@pytest.mark.parametrize(
    "speed", [{}, {"packing": False}, {"chunked_logps": False}, {"pack_length": 12, "logps_chunk_size": 3}]
)
def test_fast_sft_step_matches_the_padded_one(tmp_path, speed):
    """Padding-free rows and the chunked LM head give forward_sft's per-example NLL, metrics and gradients."""
    from transformers import AutoModelForCausalLM

    from dpokit.data.unpaired import TokenizedCompletion
    from dpokit.steps.sft import forward_sft_fast

    ids = lambda text: vocab_ids(text)  # noqa: E731
    examples = [
        TokenizedCompletion(ids("it is"), ids("fine"), True, 9),  # shortest first: packing reorders the units
        TokenizedCompletion(ids("the film was"), ids("very good <|im_end|>"), True, 9),
        TokenizedCompletion([], ids("bad and awful plot"), True, 9),
    ]  # empty prompt: the first token has no loss
    cfg = load_config(None, {f"speed.{k}": v for k, v in speed.items()})
    task = FastSFTStep(cfg.speed, cfg.model.attn_implementation)
    if speed.get("pack_length"):
        assert task.collate(examples, 0)["score_seq"].tolist()[0] != 0  # rows are not in example order here
    assert type(task) is FastSFTStep and task.count(task.collate(examples, 0)) == sum(
        example_tokens(e) for e in examples
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    results = []
    for forward, batch in ((forward_sft, collate_sft(examples, 0)), (forward_sft_fast, task.collate(examples, 0))):
        model.zero_grad(set_to_none=True)
        out, metrics = forward(model, None, batch, cfg, False)
        out.losses.sum().backward()
        results.append((out.losses.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, m0, g0), (fast, m1, g1) = results
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    for name in ("loss", "mean_token_accuracy"):
        torch.testing.assert_close(m1[name], m0[name], rtol=0, atol=1e-5, msg=name)  # both in (example, token) order
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_sft_takes_the_fast_step_by_default():
    assert type(step_for(load_config(None, {"train.task": "sft"}))) is FastSFTStep
    plain = {"train.task": "sft", "speed.packing": False, "speed.chunked_logps": False}
    assert type(step_for(load_config(None, plain))) is SFTStep


@pytest.mark.slow
def test_sft_run_on_the_fast_step_equals_the_padded_run(tmp_path):
    import dpokit
    from dpokit.training.metrics import read_metrics

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in synthetic_pairs(24, seed=3)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)

    def run(name, **speed):
        result = dpokit.train(
            {
                "model": {"name_or_path": str(tiny_model_dir())},
                "data": {"path": str(path)},
                "speed": speed,
                "optim": {"lr": 3e-3, "scheduler": "constant"},
                "train": {
                    "task": "sft",
                    "batch_size": 8,
                    "max_steps": 3,
                    "logging_steps": 1,
                    "progress_bar": False,
                    "save_steps": 0,
                },
                "out_dir": str(tmp_path / name),
            }
        )
        return [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]

    fast, plain = run("fast"), run("plain", packing=False, chunked_logps=False)
    for a, b in zip(fast, plain):
        for key in ("loss", "mean_token_accuracy", "grad_norm", "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert fast[-1]["loss"] < fast[0]["loss"]
