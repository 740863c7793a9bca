"""The local judge: a tiny untrained model, so only its symmetry is asserted, never what it prefers."""

from __future__ import annotations

import pytest
import torch

from dpokit.online.suites.local_judge import LocalJudgeError, LocalPairwiseJudge
from dpokit.tiny import build_tiny_llama, build_tokenizer

TEXT = "A B which response is the better reply to prompt answer with one letter or the film was good bad great awful"


@pytest.fixture(scope="module", params=["chat", "plain"])
def judge(request):
    kwargs = {"chat_template": None} if request.param == "plain" else {}  # plain: a "User: ... Assistant:" transcript
    tokenizer = build_tokenizer([TEXT], kind="word", **kwargs)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    return LocalPairwiseJudge(model, tokenizer, batch_size=2)


PROMPTS = ["the film was", "the film was", "the film", "was"]
A = [" good", " great film", " bad", " awful awful"]
B = [" bad", " awful", " good great good", " good"]


def test_both_orders_sum_to_one_and_a_response_ties_with_itself(judge):
    ab = judge.compare(PROMPTS, A, B)
    ba = judge.compare(PROMPTS, B, A)
    assert all(0.0 < v < 1.0 for v in ab)
    assert [x + y for x, y in zip(ab, ba)] == pytest.approx([1.0] * 4, abs=1e-6)
    assert judge.compare(PROMPTS, A, A) == pytest.approx([0.5] * 4, abs=1e-6)


def test_position_swap_cancels_a_bias_towards_A(judge):
    one_order = judge.prob_a(PROMPTS, A, B)
    swapped = judge.prob_a(PROMPTS, B, A)
    # asked in one order only, an untrained model's letter bias shows: p(A) is not 1 - p(A) of the swapped order
    assert not torch.allclose(one_order, 1 - swapped, atol=1e-4)
    assert judge.compare(PROMPTS, A, B) == pytest.approx(((one_order + 1 - swapped) / 2).tolist(), abs=1e-6)


def test_batching_and_left_padding_do_not_change_the_verdict(judge):
    together = judge.prob_a(PROMPTS, A, B)
    alone = torch.cat([judge.prob_a([p], [a], [b]) for p, a, b in zip(PROMPTS, A, B)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_a_tokenizer_without_the_letters_is_refused():
    tokenizer = build_tokenizer(["the film was good bad"], kind="word")
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    with pytest.raises(LocalJudgeError, match="distinct tokens for 'A' and 'B'"):
        LocalPairwiseJudge(model, tokenizer)
