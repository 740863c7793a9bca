"""dpokit.generation.sample: seeding, left padding, EOS handling, state restoration.

The models here are untrained tiny Llamas; where a test needs a known
next-token distribution, a forward hook on the LM head replaces the logits, so
the expected behaviour does not depend on what a random model happens to do.
"""

from __future__ import annotations

import math

import torch

from dpokit.demo import world
from dpokit.generation import Sample, sample
from tiny_assets import model, tokenizer  # noqa: F401 (pytest fixtures)


def fix_next_token_distribution(model, tokenizer, p_eos: float):
    """Make every step sample EOS with probability p_eos, else a uniform ordinary word.

    Other special tokens (pad, bos, ...) get probability 0, so any pad id in the
    output would have to come from padding, which the test can then detect.
    """
    vocab = len(tokenizer)
    words = vocab - len(tokenizer.all_special_ids)
    eos_logit = math.log(p_eos * words / (1 - p_eos)) if p_eos < 1 else 1e4

    def hook(module, inputs, logits):
        logits = torch.zeros_like(logits)
        logits[..., tokenizer.all_special_ids] = -float("inf")
        logits[..., tokenizer.eos_token_id] = eos_logit
        return logits

    return model.lm_head.register_forward_hook(hook)


PROMPTS = ["the film was", "my friend said the plot was", "i watched this movie and the acting felt"]


def test_same_seed_same_samples_and_global_rng_untouched(model, tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = sample(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=6, seed=7)
    assert torch.equal(torch.rand(3), expected_next), "sampling must not move the caller's RNG"
    b = sample(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=6, seed=7)
    c = sample(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=6, seed=8)
    assert a == b
    assert [s.completion_ids for s in a] != [s.completion_ids for s in c]


def test_prompt_major_order_and_fields(model, tokenizer):
    out = sample(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=4, seed=0, batch_size=4)
    assert [s.prompt for s in out] == [p for p in PROMPTS for _ in range(2)]
    for s in out:
        assert isinstance(s, Sample)
        assert s.prompt_ids == tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.pad_token_id not in s.prompt_ids
        assert tokenizer.decode(s.prompt_ids + s.completion_ids, skip_special_tokens=True) == s.prompt + s.completion


def test_left_padding_gives_the_same_greedy_completion(model, tokenizer):
    short = "the film was"
    alone = sample(model, tokenizer, [short], temperature=0, max_new_tokens=8)[0]
    batched = sample(model, tokenizer, [PROMPTS[2], short, PROMPTS[1]], temperature=0, max_new_tokens=8)[1]
    assert alone.completion_ids == batched.completion_ids
    assert alone.completion == batched.completion


def test_eos_handling(model, tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    handle = fix_next_token_distribution(model, tokenizer, p_eos=0.3)
    try:
        out = sample(model, tokenizer, PROMPTS, num_samples=20, max_new_tokens=5, seed=0)
    finally:
        handle.remove()
    finished = [s for s in out if s.finished]
    unfinished = [s for s in out if not s.finished]
    assert finished and unfinished  # p(no EOS in 5 steps) = 0.7**5, about 1 in 6
    for s in finished:
        assert s.completion_ids[-1] == eos and s.completion_ids.count(eos) == 1
        assert pad not in s.completion_ids
        assert world.vocabulary() and all(w in world.vocabulary() for w in s.completion.split())
    for s in unfinished:
        assert len(s.completion_ids) == 5 and eos not in s.completion_ids and pad not in s.completion_ids
    # Rows that finish early are padded by generate inside the batch; lengths must vary.
    assert len({len(s.completion_ids) for s in out}) > 1


def test_immediate_eos_gives_empty_completion(model, tokenizer):
    handle = fix_next_token_distribution(model, tokenizer, p_eos=1.0)
    try:
        out = sample(model, tokenizer, PROMPTS, max_new_tokens=5, seed=0)
    finally:
        handle.remove()
    assert all(s.finished and s.completion_ids == [tokenizer.eos_token_id] and s.completion == "" for s in out)


def test_completion_text_keeps_the_separating_space(model, tokenizer):
    handle = fix_next_token_distribution(model, tokenizer, p_eos=0.01)
    try:
        out = sample(model, tokenizer, ["the film was"], num_samples=4, max_new_tokens=3, seed=0)
    finally:
        handle.remove()
    for s in out:
        assert s.completion.startswith(" ") and len(s.completion.split()) == len(s.completion_ids) - s.finished


def test_restores_training_mode_and_padding_side(model, tokenizer):
    model.train()
    tokenizer.padding_side = "right"
    sample(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert model.training and tokenizer.padding_side == "right"
    model.eval()
    sample(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert not model.training


def test_tokenizer_without_pad_token(model, tokenizer):
    pad = tokenizer.pad_token
    tokenizer.pad_token = None
    try:
        out = sample(model, tokenizer, PROMPTS, max_new_tokens=3, seed=0)
        assert len(out) == 3 and tokenizer.pad_token is None
    finally:
        tokenizer.pad_token = pad
    assert sample(model, tokenizer, [], max_new_tokens=3) == []
