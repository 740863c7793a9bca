"""KTO end to end: unpaired layouts to exact examples, honest skips, the mismatched KL batch, the step, learning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import dpokit
from dpokit.config import ConfigError, load_config
from dpokit.data.prepare import format_summary
from dpokit.data.records import DataError
from dpokit.data.unpaired import TokenizedCompletion, UnpairedExample, load_unpaired, prepare_unpaired, tokenize_groups
from dpokit.steps import UnpairedStep, step_for
from dpokit.steps.unpaired import collate_unpaired, forward_unpaired, mismatch_shift
from dpokit.logprobs import completion_logps
from dpokit.training.metrics import read_metrics
from tiny_assets import assistant, synthetic_pairs, tiny_model_dir, user, vocab_ids, word_tokenizer, write_jsonl

SHARED_KTO = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "kto_unpaired_messages_label" / "kto_en_demo.json"
)


def load(tmp_path, rows, **options):
    groups, report = load_unpaired(str(write_jsonl(tmp_path / "d.jsonl", rows)), **options)
    return [[(e.prompt, e.completion, e.label) for e in group] for group in groups], report


# --- layouts -------------------------------------------------------------------------------


def test_prompt_completion_label_text_and_conversational(tmp_path):
    rows = [
        {"prompt": "the film", "completion": " good", "label": True},
        {"prompt": [user("hi")], "completion": [assistant("hello")], "label": False},
        {"prompt": "it is", "completion": " bad", "label": 0},
        {"prompt": "it is", "completion": " fine", "label": "true"},  # CSV has only strings
    ]
    groups, report = load(tmp_path, rows)
    assert groups == [
        [("the film", " good", True)],
        [([user("hi")], [assistant("hello")], False)],
        [("it is", " bad", False)],
        [("it is", " fine", True)],
    ]
    assert report.layouts == {"prompt_completion_label": 4} and report.rows_used == 4


def test_messages_label_last_assistant_turn_is_the_completion(tmp_path):
    rows = [
        {"messages": [user("hi"), assistant("hello"), user("how are you"), assistant("fine thanks")], "label": False},
        # argilla/kto-mix-15k: the whole conversation in `completion`, no prompt column
        {"completion": [user("tell me story"), assistant("once upon time")], "label": True},
    ]
    groups, report = load(tmp_path, rows)
    assert groups == [
        [([user("hi"), assistant("hello"), user("how are you")], [assistant("fine thanks")], False)],
        [([user("tell me story")], [assistant("once upon time")], True)],
    ]
    assert report.layouts == {"messages_label": 2}


def test_paired_rows_split_into_one_desirable_and_one_undesirable(tmp_path):
    rows = [
        {"prompt": "the film", "chosen": " good", "rejected": " bad"},
        {"instruction": "tell me story", "chosen": "once", "rejected": "no"},
    ]
    groups, report = load(tmp_path, rows)
    assert groups[0] == [("the film", " good", True), ("the film", " bad", False)]
    assert groups[1] == [
        ([user("tell me story")], [assistant("once")], True),
        ([user("tell me story")], [assistant("no")], False),
    ]
    assert report.layouts == {"prompt_chosen_rejected (pairs split)": 1, "alpaca (pairs split)": 1}


def test_column_mapping(tmp_path):
    rows = [{"question": "the film", "answer": " good", "thumbs_up": 1}]
    groups, _ = load(tmp_path, rows, columns={"prompt": "question", "completion": "answer", "label": "thumbs_up"})
    assert groups == [[("the film", " good", True)]]


def test_bad_rows_are_skipped_and_counted_with_file_row_and_field(tmp_path):
    rows = [
        {"prompt": "a", "completion": " b", "label": True},
        {"prompt": "a", "completion": " b", "label": "maybe"},
        {"prompt": "a", "completion": " b", "label": 2},
        {"prompt": "a", "completion": " b"},
        {"prompt": "a", "completion": "  ", "label": True},
        {"prompt": [user("a")], "completion": " b", "label": True},
        {"messages": [user("a"), assistant("b"), user("c")], "label": True},
        {"messages": [assistant("b")], "label": True},
        {"text": "a"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    groups, report = load_unpaired(str(path))
    assert len(groups) == 1 and (report.rows_read, report.rows_used, report.rows_skipped) == (9, 1, 8)
    assert report.examples["label must be a bool (true/false) or 0/1, got 'maybe'"] == [f"{path}:2 (label)"]
    assert report.examples["label must be a bool (true/false) or 0/1, got 2"] == [f"{path}:3 (label)"]
    assert report.examples["label is missing"] == [f"{path}:4 (label)"]
    assert report.examples["completion is empty or whitespace-only"] == [f"{path}:5 (completion)"]
    assert report.examples["prompt and completion mix text and message lists"] == [f"{path}:6 (completion)"]
    assert report.examples["messages must end with the assistant message being judged"] == [f"{path}:7 (messages)"]
    assert report.examples["messages has no prompt before the judged assistant message"] == [f"{path}:8 (messages)"]
    assert any(reason.startswith("unrecognised unpaired layout (columns: text") for reason in report.skipped)
    with pytest.raises(DataError) as caught:
        load_unpaired(str(path), strict=True)
    assert str(caught.value) == f"{path}, row 2, field 'label': label must be a bool (true/false) or 0/1, got 'maybe'"


def test_all_rows_bad_is_an_error(tmp_path):
    with pytest.raises(DataError, match="all 2 rows were skipped"):
        load(tmp_path, [{"prompt": "a", "completion": " b", "label": None}] * 2)


def test_real_kto_en_demo_sample():
    if not SHARED_KTO.is_file():
        pytest.skip(f"shared sample data not found at {SHARED_KTO}")
    groups, report = load_unpaired(str(SHARED_KTO))
    examples = [e for group in groups for e in group]
    assert (report.rows_read, report.rows_used, report.rows_skipped) == (300, 300, 0)
    assert report.layouts == {"messages_label": 300}
    assert (sum(e.label for e in examples), sum(not e.label for e in examples)) == (150, 150)
    raw = json.loads(SHARED_KTO.read_text())
    for example, row in zip(examples, raw):  # exact: prompt = all but the last message, completion = the last
        assert example.prompt == row["messages"][:-1] and example.completion == row["messages"][-1:]
        assert example.label is row["label"]
    assert examples[0].completion[0]["content"].startswith("Ooh ooh ah ah! *giggle*")
    assert sum(len(e.prompt) > 1 for e in examples) == 77  # multi-turn rows keep their earlier turns


# --- tokens --------------------------------------------------------------------------------


def test_tokenisation_text_chat_and_truncation():
    tok = word_tokenizer()
    groups = [
        [UnpairedExample("the film was", " good", True, "t:1")],
        [UnpairedExample([user("hi")], [assistant("hello")], False, "t:2")],
        [UnpairedExample("the film was a movie it is", " very good acting plot", True, "t:3")],
    ]
    out, stats = tokenize_groups(groups, tok, max_length=8, max_prompt_length=6)
    assert (out[0].prompt_ids, out[0].completion_ids, out[0].label) == (
        vocab_ids("the film was"),
        vocab_ids("good <|im_end|>"),
        True,
    )
    assert out[0].completion_budget == 8 - 3
    assert out[1].prompt_ids == vocab_ids("<|im_start|> user hi <|im_end|> <|im_start|> assistant")
    assert out[1].completion_ids == vocab_ids("hello <|im_end|>") and out[1].label is False
    # prompt cut from the left to 6, completion from the right to 8 - 6 = 2 (its EOS is lost)
    assert (out[2].prompt_ids, out[2].completion_ids) == (vocab_ids("film was a movie it is"), vocab_ids("very good"))
    assert (stats.prompts_truncated, stats.chosen_truncated, stats.rejected_truncated) == (1, 1, 0)


def test_prepare_keeps_split_pairs_together_and_prints_a_summary(tmp_path):
    rows = synthetic_pairs(20, seed=3)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(
        {
            "model": {"name_or_path": "unused"},
            "data": {"path": str(path), "eval_fraction": 0.25, "max_length": 32, "max_prompt_length": 16},
            "loss": {"type": "kto"},
        }
    )
    data = prepare_unpaired(cfg, word_tokenizer())
    assert (len(data.train), len(data.eval)) == (30, 10)
    train_sources, eval_sources = {e.source for e in data.train}, {e.source for e in data.eval}
    assert not train_sources & eval_sources and len(eval_sources) == 5
    assert data.summary["train"]["labels"] == {"desirable": 15, "undesirable": 15}
    assert data.summary["train"]["held_out"] == 5 and data.summary["train"]["rows_used"] == 15
    text = format_summary(data.summary)
    assert "[data] train: 20 rows read, 30 pairs used" in text and "held out for eval" in text


# --- collate and the step ------------------------------------------------------------------


def completions(*specs):
    return [TokenizedCompletion(p, c, label, budget, src) for p, c, label, budget, src in specs]


def test_collate_pairs_prompt_i_with_completion_i_plus_1():
    batch = collate_unpaired(
        completions(([1, 2], [10], True, 6, "a"), ([3], [11, 12], False, 6, "b"), ([4, 5, 6], [13], True, 6, "c")),
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[1, 2, 10, 0], [3, 11, 12, 0], [4, 5, 6, 13]]
    assert batch["labels"].tolist() == [[-100, -100, 10, -100], [-100, 11, 12, -100], [-100, -100, -100, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # KL row i = prompt i + completion (i+1) mod 3
    assert batch["kl_input_ids"].tolist() == [[1, 2, 11, 12], [3, 13, 0, 0], [4, 5, 6, 10]]
    assert batch["kl_labels"].tolist() == [[-100, -100, 11, 12], [-100, 13, -100, -100], [-100, -100, -100, 10]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False, True]
    assert UnpairedStep().count(batch) == 3


def test_collate_kl_respects_the_budget_and_never_rematches_a_split_pair():
    # prompt 1 leaves room for 2 completion tokens (data.max_length - its length): its KL completion is cut to 2
    batch = collate_unpaired(
        completions(([1], [10], True, 2, "a"), ([2, 3], [11, 12, 13, 14], False, 1, "b")), pad_token_id=0
    )
    assert batch["kl_input_ids"].tolist() == [[1, 11, 12], [2, 3, 10]]
    assert batch["kl_labels"].tolist() == [[-100, 11, 12], [-100, -100, 10]]
    assert mismatch_shift(["p1", "p1", "p2", "p2", "p3", "p3"]) == 2  # halves of a pair side by side (eval order)
    assert mismatch_shift(["a", "b", "c"]) == 1 and mismatch_shift(["a", "a"]) == 1
    single = collate_unpaired(completions(([1], [10], True, 6, "a")), 0)
    assert "kl_input_ids" not in single  # nothing to mismatch: z0 = 0


def test_step_at_initialisation_gives_half_loss_and_class_split_metrics():
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    cfg = load_config({"loss": {"type": "kto", "beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.5}})
    specs = [
        (vocab_ids("the film"), vocab_ids("good <|im_end|>"), True, 10, "a"),
        (vocab_ids("it is"), vocab_ids("bad <|im_end|>"), False, 10, "b"),
        (vocab_ids("a movie"), vocab_ids("very bad plot <|im_end|>"), False, 10, "c"),
    ]
    batch = collate_unpaired(completions(*specs), 0)
    out, metrics = forward_unpaired(policy, reference, batch, cfg, with_reference=True)
    # policy == reference: r = 0 and z0 = 0, so each loss is weight * (1 - sigma(0)) = weight / 2
    torch.testing.assert_close(out.losses, torch.tensor([0.75, 0.25, 0.25]))
    assert metrics["rewards/chosen"].shape == (1,) and metrics["rewards/rejected"].shape == (2,)
    assert metrics["kl"].tolist() == [0.0] * 3 and "rewards/margins" not in metrics
    expected = completion_logps(policy, [s[0] for s in specs], [s[1] for s in specs], pad_token_id=0)
    torch.testing.assert_close(metrics["logps/chosen"], expected[:1])
    torch.testing.assert_close(metrics["logps/rejected"], expected[1:])
    out.losses.sum().backward()  # the graph runs through the matched completions only
    assert any(p.grad is not None for p in policy.parameters())


def test_config_accepts_kto_and_rejects_what_cannot_work(tmp_path):
    cfg = load_config({"loss": {"type": "kto"}})
    assert type(step_for(cfg)) is UnpairedStep
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_config({"loss": {"type": ["kto", "sft"]}})
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        UnpairedStep().prepare(load_config({"loss": {"type": "kto"}, "train": {"batch_size": 1}}), word_tokenizer())


# --- learning ------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_learns_good_from_bad_with_unpaired_labels(tmp_path):
    """Train on unpaired halves of the synthetic task; held-out pairs (split by the loader) separate."""
    rng = random.Random(0)
    rows = []
    for pair in synthetic_pairs(256, seed=1):
        good = rng.random() < 0.5  # each prompt appears once, with either its good or its bad completion
        rows.append(
            {"prompt": pair["prompt"], "completion": pair["chosen"] if good else pair["rejected"], "label": good}
        )
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held_out_pairs = synthetic_pairs(64, seed=2)
    held_out = write_jsonl(tmp_path / "eval.jsonl", held_out_pairs)
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(train), "eval_path": str(held_out), "max_length": 32, "max_prompt_length": 16},
        "loss": {"type": "kto", "beta": 0.5},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {
            "batch_size": 16,
            "max_steps": 10,
            "logging_steps": 5,
            "eval_steps": 5,
            "eval_batch_size": 32,
            "progress_bar": False,
        },
        "out_dir": str(tmp_path / "run"),
    }
    result = dpokit.train(cfg)
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval_loss" in r]
    gaps = [r["eval_rewards/chosen"] - r["eval_rewards/rejected"] for r in evals]  # 0 at the start: policy == reference
    assert len(gaps) == 2 and 0 < gaps[0] < gaps[1] and gaps[1] > 2.5, gaps
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9 and evals[-1]["eval_loss"] < 0.3

    from transformers import AutoModelForCausalLM

    tok = word_tokenizer()
    prompts = [tok(p["prompt"])["input_ids"] for p in held_out_pairs]

    def gap(model):  # mean over held-out prompts of log p(good ...) - log p(bad ...)
        good = completion_logps(
            model, prompts, [tok(p["chosen"] + "<|im_end|>")["input_ids"] for p in held_out_pairs], 0
        )
        bad = completion_logps(
            model, prompts, [tok(p["rejected"] + "<|im_end|>")["input_ids"] for p in held_out_pairs], 0
        )
        return (good - bad).mean().item()

    before, after = (
        gap(AutoModelForCausalLM.from_pretrained(tiny_model_dir())),
        gap(AutoModelForCausalLM.from_pretrained(result.model_dir)),
    )
    print(f"\nkto: eval reward gap {gaps}, held-out log p(good) - log p(bad) {before:.2f} -> {after:.2f} nats")
    assert after > before + 4.0, (before, after)
