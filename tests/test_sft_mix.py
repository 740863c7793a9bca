"""SFT mixing during DPO (data.sft_mix_path, loss.sft_mix_weight, data.sft_mix_batch_size): the gradient it adds,
its invariance to gradient accumulation (plain and fast steps), its metric, the refusals, and that it keeps the
demo language's SFT text from being forgotten."""

import copy
import json
import dataclasses

import pytest
import torch
from accelerate import Accelerator

import dpokit
from dpokit.config import ConfigError, load_config
from dpokit.data.batching import BatchStream, micro_batch
from dpokit.models import load_policy, load_tokenizer
from dpokit.steps import FastPairedStep, PairedStep, StepContext
from dpokit.steps.sft import collate_sft
from dpokit.steps.sft_mix import SFTMix, mix_batch_size
from dpokit.training.metrics import MetricSums, read_metrics
from dpokit.training.step_runner import StepJob, accumulate_gradients
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

SFT_ROWS = [{"prompt": p, "completion": c} for p, c in [
    ("the film was", " very good and the plot is fine"), ("tell me a story", " once upon a time"),
    ("the acting", " is awful but the movie is great"), ("hello", " hi how are you"),
    ("what colour is the sky", " blue"), ("i am", " fine thanks"), ("the plot", " is bad"), ("yes", " no maybe"),
]]  # fmt: skip


def _cfg(tmp_path, **sections):
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {
            "path": str(write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32, seed=1))),
            "max_length": 32,
            "max_prompt_length": 16,
            "sft_mix_path": str(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)),
        },
        "loss": {"beta": 0.1, "sft_mix_weight": 0.7},
        "train": {
            "batch_size": 8,
            "max_steps": 2,
            "logging_steps": 1,
            "progress_bar": False,
            "save_steps": 0,
            "gradient_checkpointing": False,
        },
        "speed": {"ref_cache": False},
        "out_dir": str(tmp_path / "run"),
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return load_config(cfg)


def _gradients(cfg, step, policy, reference, data, tokenizer, batch_size, accum, mix=True):
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, batch_size=batch_size, grad_accum=accum),
        data=dataclasses.replace(cfg.data, sft_mix_batch_size=4 // accum),
    )
    stream = BatchStream(len(data.train), batch_size, cfg.train.seed)
    pad = tokenizer.pad_token_id
    micro = [micro_batch(data.train, stream, step.collate, pad, step.weight, step.tokens) for _ in range(accum)]
    mixed = SFTMix.from_config(cfg, tokenizer).draw(1, pad) if mix else None
    policy.zero_grad(set_to_none=True)
    sums = MetricSums()
    job = StepJob(policy, reference, step, StepContext(cfg, True, mixed=mixed, group=Accelerator(cpu=True)))
    accumulate_gradients(job, [m.batch for m in micro], sums, sum(m.examples for m in micro), [m.dummy for m in micro])
    return [p.grad.clone() for p in policy.parameters()], sums.reduce()


@pytest.fixture()
def setup(tmp_path):
    cfg = _cfg(tmp_path)
    tokenizer = load_tokenizer(cfg)
    policy = load_policy(cfg)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return cfg, tokenizer, policy, reference


def test_the_mixed_term_is_the_weighted_token_mean_nll_and_accumulation_does_not_change_it(setup):
    cfg, tokenizer, policy, reference = setup
    plain, fast = PairedStep(), FastPairedStep(cfg.speed)
    data = plain.prepare(cfg, tokenizer)
    with_mix, metrics = _gradients(cfg, plain, policy, reference, data, tokenizer, 8, 1)
    without, _ = _gradients(cfg, plain, policy, reference, data, tokenizer, 8, 1, mix=False)

    # By hand: the step's 4 mixed examples (the BatchStream's first 4 of the SFT rows), their token-mean NLL, x 0.7.
    mix = SFTMix.from_config(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sft_mix_batch_size=4)), tokenizer
    )
    first = BatchStream(len(mix.examples), 4, mix.seed).next()[0]
    batch = collate_sft([mix.examples[i] for i in first], tokenizer.pad_token_id)
    policy.zero_grad(set_to_none=True)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    (0.7 * nll).backward()
    for g_mix, g_without, p in zip(with_mix, without, policy.parameters()):
        torch.testing.assert_close(g_mix - g_without, p.grad, atol=1e-6, rtol=1e-4)
    assert metrics["sft_mix/nll"] == pytest.approx(nll.item(), rel=1e-5)  # logged before its weight

    # batch 8 x accumulation 1 == batch 4 x accumulation 2 (with 4 and 2 x 2 mixed rows), plain and fast steps alike.
    for step in (plain, fast):
        step_data = step.prepare(cfg, tokenizer)
        accumulated, acc_metrics = _gradients(cfg, step, policy, reference, step_data, tokenizer, 4, 2)
        for a, b in zip(accumulated, with_mix):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        assert acc_metrics["sft_mix/nll"] == pytest.approx(metrics["sft_mix/nll"], rel=1e-5)


def test_a_resumed_run_draws_the_same_mixed_rows(setup):
    cfg, tokenizer, _, _ = setup
    a, b = SFTMix.from_config(cfg, tokenizer), SFTMix.from_config(cfg, tokenizer)
    pad = tokenizer.pad_token_id
    assert torch.equal(a.draw(5, pad).batches[0]["input_ids"], b.draw(5, pad).batches[0]["input_ids"])
    assert mix_batch_size(cfg) == 1  # ceil(8 / 10): about a tenth as many SFT rows as pairs


def test_training_logs_the_mixed_term_separately(tmp_path):
    result = dpokit.train(_cfg(tmp_path, train={"max_steps": 2, "grad_accum": 2, "batch_size": 4}))
    train = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert all(r["sft_mix/nll"] > 0 for r in train) and all(
        r["loss"] < 1.0 for r in train
    )  # loss: the preference loss alone


@pytest.mark.parametrize("sections,message", [
    ({"loss": {"type": "kto"}}, "loss.type"),
    ({"train": {"task": "sft"}}, "train.task=sft"),
    ({"loss": {"sft_mix_weight": 0.0}}, "loss.sft_mix_weight"),
    ({"data": {"sft_mix_path": None, "sft_mix_batch_size": 2}}, "data.sft_mix_batch_size"),
])  # fmt: skip
def test_unsupported_combinations_are_refused_naming_the_keys(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **sections)


# --- the learning test: on the demo language, mixing keeps the SFT text ------------------------


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """A small SFT model of the demo language (test_pipeline's: built once per session), its pairs and SFT text.

    Not the `demo:` paths, which would build the full-size demo model (minutes on a busy machine).
    The retention rows are the SFT corpus' own mix (40% positive), the distribution the mix file is
    drawn from, not the demo's positive-only retention set: in 20 steps this small model loses
    little of the positive reviews (a delta of about 0.02), and what mixing holds is the corpus.
    """
    from dpokit.demo import world
    from dpokit.demo.sft import SFTConfig, build_preference_data, build_sft_model, build_sft_text

    model = build_sft_model(seed=0, config=SFTConfig(hidden_size=64, steps=200, n_sequences=2000, lr=5e-3))
    pairs, _ = build_preference_data(n_train=480, n_eval=8)
    _, mix = build_sft_text()
    corpus = world.sft_corpus(200, seed=2_000_003, positive_share=SFTConfig.positive_share)
    retention = write_jsonl(
        tmp_path_factory.mktemp("retention") / "corpus-mix.jsonl",
        [{"prompt": opening, "completion": continuation} for opening, continuation in corpus],
    )
    return {"model": str(model), "pairs": str(pairs), "retention": str(retention), "mix": str(mix)}


def test_mixing_lowers_the_retention_drift_of_an_aggressive_run_on_the_demo_language(tmp_path, small_demo):
    def run(name, **data):
        cfg = {
            "model": {"name_or_path": small_demo["model"]},
            "data": {
                "path": small_demo["pairs"],
                "retention_path": small_demo["retention"],
                "max_length": 40,
                "max_prompt_length": 16,
                **data,
            },
            "loss": {"beta": 0.1},
            "optim": {"lr": 5e-4, "scheduler": "constant"},  # docs/demo.md's aggressive setting
            "train": {
                "batch_size": 16,
                "max_steps": 20,
                "logging_steps": 10,
                "eval_steps": 0,
                "progress_bar": False,
                "save_steps": 0,
                "gradient_checkpointing": False,
            },
            "out_dir": str(tmp_path / name),
        }
        records = [r for r in read_metrics(dpokit.train(cfg).run_dir / "metrics.jsonl") if "retention/nll_delta" in r]
        return records[-1]["retention/nll_delta"]

    without = run("plain")
    mixed = run("mixed", sft_mix_path=small_demo["mix"], sft_mix_batch_size=4)
    assert without > 0.1  # the aggressive run forgets the SFT text ...
    assert mixed < 0.6 * without, (mixed, without)  # ... and mixing SFT rows into it keeps most of it


def test_rows_of_the_mix_file_that_fail_to_parse_are_reported_and_summarised(tmp_path, capsys):
    # Issue 20: 3 of 5 bad rows were dropped with nothing printed and nothing in data_summary.json.
    bad = [{"text_only": "x"}, {"prompt": "p", "completion": " c", "label": False}, {"prompt": "p", "completion": 3}]
    mix = write_jsonl(tmp_path / "mix.jsonl", SFT_ROWS[:2] + bad)
    result = dpokit.train(_cfg(tmp_path, data={"sft_mix_path": str(mix)}, train={"max_steps": 1}))
    out = capsys.readouterr().out
    assert "[data] sft_mix: 5 rows read" in out and "3 dropped" in out and "unrecognised SFT layout" in out
    section = json.loads((result.run_dir / "data_summary.json").read_text())["sft_mix"]
    assert (section["path"], section["rows_read"], section["rows_used"], section["rows_skipped"]) == (str(mix), 5, 2, 3)
    assert sum(section["skipped_by_reason"].values()) == 3 and section["pairs"] == 2
