"""The demo world: its language and reward, cached SFT model and data, and evaluation."""

from __future__ import annotations

import copy
import json
import random
import time
from collections import Counter

import pytest
import torch

from dpokit.demo import sft, world
from dpokit.online import demo_eval as evaluate
from dpokit.tiny import build_tiny_llama, build_tokenizer


def test_world_is_deterministic():
    assert world.sft_corpus(50, seed=3) == world.sft_corpus(50, seed=3)
    assert world.sft_corpus(50, seed=3) != world.sft_corpus(50, seed=4)
    assert world.preference_pairs(30, seed=1) == world.preference_pairs(30, seed=1)
    a, b = random.Random(5), random.Random(5)
    assert [world.sample_opening(a) for _ in range(20)] == [world.sample_opening(b) for _ in range(20)]
    assert world.eval_prompts(10, seed=2) == world.eval_prompts(10, seed=2)


@pytest.mark.parametrize(
    "text, expected",
    [
        (" great and i loved it", 1.0),
        (" dull and we hated the plot", 0.0),
        (" long and it ran about two hours", 0.5),  # no sentiment words
        (" great but the ending was dull", 0.5),  # a tie
        (" dull but i loved the plot and the music was superb", 1.0),  # majority wins
        ("the film was boring and my friend disliked it but i adored it", 0.0),
        ("", 0.5),
    ],
)
def test_sentiment_rule(text, expected):
    assert world.sentiment(text) == expected
    assert world.is_positive(text) == (expected == 1.0)


def test_continuations_are_grammatical_and_labelled():
    rng = random.Random(0)
    vocab = set(world.vocabulary())
    for label, value in (("positive", 1.0), ("negative", 0.0)):
        for _ in range(500):
            text = world.sample_continuation(rng, label)
            words = text.split()
            assert text.startswith(" ") and not text.startswith("  ")
            assert world.MIN_WORDS <= len(words) <= world.MAX_WORDS
            assert set(words) <= vocab
            assert world.sentiment(text) == value
            assert world.is_well_formed(text)
    for _ in range(200):
        opening = world.sample_opening(rng, "all")
        assert world.sentiment(opening) == 0.5 and set(opening.split()) <= vocab


@pytest.mark.parametrize(
    "text",
    [
        "",
        " great great great",
        " really great and",
        " the plot was great",
        " great and the plot was",
        " great and i zzz it",
    ],
)
def test_ill_formed_completions_are_rejected(text):
    assert not world.is_well_formed(text)


def test_preference_pairs_have_no_length_bias():
    pairs = world.preference_pairs(4000, seed=0)
    assert all(world.is_positive(p["chosen"]) and world.sentiment(p["rejected"]) == 0.0 for p in pairs)
    assert all(world.opening_split(p["prompt"]) == "train" for p in pairs)
    chosen = [len(p["chosen"].split()) for p in pairs]
    rejected = [len(p["rejected"].split()) for p in pairs]
    assert abs(sum(chosen) - sum(rejected)) / len(pairs) < 0.15  # mean length differs by < 0.15 words
    longer = sum(c > r for c, r in zip(chosen, rejected))
    shorter = sum(c < r for c, r in zip(chosen, rejected))
    assert 0.45 < longer / (longer + shorter) < 0.55
    hist_c, hist_r = Counter(chosen), Counter(rejected)
    assert sum(abs(hist_c[k] - hist_r[k]) for k in hist_c | hist_r) / len(pairs) < 0.1  # total variation * 2


def test_held_out_openings():
    assert len(world.all_openings("eval")) > 100
    assert set(world.all_openings("eval")).isdisjoint(world.all_openings("train"))
    prompts = world.eval_prompts(50, seed=0)
    assert len(set(prompts)) == 50 and all(world.opening_split(p) == "eval" for p in prompts)
    assert all(world.opening_split(p["prompt"]) == "eval" for p in world.preference_pairs(100, 0, split="eval"))
    corpus = world.sft_corpus(3000, seed=0)
    assert all(world.opening_split(o) == "train" for o, _ in corpus)
    assert 0.37 < sum(world.is_positive(c) for _, c in corpus) / len(corpus) < 0.43


def test_word_tokenizer_covers_the_language():
    tok = build_tokenizer([" ".join(world.vocabulary())], kind="word")
    texts = [o + c for o, c in world.sft_corpus(300, seed=1)]
    for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"]):
        assert tok.unk_token_id not in ids and len(ids) == len(text.split())
        assert tok.decode(ids) == text


def test_preference_data_is_cached_atomically(tmp_path):
    train, held_out = sft.build_preference_data(tmp_path, n_train=40, n_eval=10, seed=0)
    mtime = train.stat().st_mtime_ns
    assert sft.build_preference_data(tmp_path, n_train=40, n_eval=10, seed=0) == (train, held_out)
    assert train.stat().st_mtime_ns == mtime
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    eval_rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert len(rows) == 40 and len(eval_rows) == 10 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert all(world.opening_split(r["prompt"]) == "eval" for r in eval_rows)
    assert [p.name for p in tmp_path.iterdir()] == [train.parent.name]  # no temp folders left


def test_failed_build_leaves_nothing(tmp_path):
    def broken(folder):
        (folder / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        sft._cached_build(tmp_path / "artefact", broken, force=False)
    assert list(tmp_path.iterdir()) == []


def test_version_changes_with_settings():
    base = sft.sft_version(sft.SFTConfig(), seed=0)
    assert base == sft.sft_version(sft.SFTConfig(), seed=0)
    assert base != sft.sft_version(sft.SFTConfig(), seed=1)
    assert base != sft.sft_version(sft.SFTConfig(steps=10), seed=0)


@pytest.fixture(scope="module")
def tiny_setup():
    tok = build_tokenizer([" ".join(world.vocabulary())], kind="word")
    return build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0), tok


def test_evaluate_policy_against_itself(tiny_setup):
    model, tok = tiny_setup
    pairs = world.preference_pairs(12, seed=0, split="eval")
    prompts = world.eval_prompts(4, seed=0)
    for reference in (model, copy.deepcopy(model)):
        m = evaluate.evaluate_policy(model, reference, tok, prompts, pairs, num_samples=2, seed=0, max_new_tokens=8)
        assert m["kl_to_reference"] == 0.0 and m["preference_accuracy"] == 0.0  # every pair ties
    assert 0 <= m["positive_share"] <= 1 and 0 <= m["well_formed_share"] <= 1 and m["num_samples"] == 8
    assert len(m["examples"]) == 3 and m["examples"][0][0] == prompts[0]  # [prompt, completion] of prompts 0, 1, 2
    table = evaluate.format_table(m, m)
    assert (
        "SFT (before)" in table
        and "DPO (after)" in table
        and "KL" in table
        and f"SFT: ...{m['examples'][1][1]}" in table
    )


def test_kl_is_positive_for_a_different_policy(tiny_setup):
    model, tok = tiny_setup
    policy = copy.deepcopy(model)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))
    m = evaluate.evaluate_policy(
        policy, model, tok, world.eval_prompts(4, 0), [], num_samples=4, seed=0, max_new_tokens=8
    )
    assert m["kl_to_reference"] > 0.01


def test_small_sft_model_learns_the_language(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.generation import sample

    config = sft.SFTConfig(hidden_size=64, steps=200, n_sequences=2000, lr=5e-3)
    path = sft.build_sft_model(tmp_path, seed=0, config=config)
    start = time.perf_counter()
    assert sft.build_sft_model(tmp_path, seed=0, config=config) == path
    assert time.perf_counter() - start < 1.0  # cached: no retraining
    assert json.loads((path / "sft_info.json").read_text())["config"]["steps"] == 200
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    out = sample(model, tok, world.eval_prompts(50, seed=0), num_samples=4, max_new_tokens=20, seed=0)
    well_formed = sum(s.finished and world.is_well_formed(s.completion) for s in out) / len(out)
    positive = sum(world.sentiment(s.completion) for s in out) / len(out)
    assert well_formed >= 0.85, well_formed
    assert 0.25 <= positive <= 0.55, positive


def test_the_sft_build_shows_a_progress_bar_with_a_count(tmp_path, capsys):
    """The demo's SFT build printed nothing for 30 s (minutes on a busy machine); now a bar counts its steps (15.13)."""
    small = sft.SFTConfig(
        hidden_size=16, num_layers=1, num_heads=2, n_sequences=32, steps=12, batch_size=8, warmup_steps=2
    )
    sft.build_sft_model(tmp_path, config=small)
    err = capsys.readouterr().err
    assert "[demo] SFT model" in err and "12/12" in err
