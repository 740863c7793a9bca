"""`dpokit eval`: score, win rate, KL from the policy's own samples, length, held-out preference accuracy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dpokit.config import EvalConfig
from dpokit.demo import world
from dpokit.online.eval_metrics import format_report
from dpokit.online.evaluation import evaluate, kl_to_reference, log_ratios, preference_accuracy
from dpokit.generation import sample
from dpokit.online.scoring import FunctionScorer
from tiny_assets import model, tokenizer  # noqa: F401 (pytest fixtures)


def fix_distribution(model, tokenizer, p_eos: float, boost: dict | None = None):
    """Every step: EOS with probability p_eos, else a uniform ordinary word (logits += boost[word] if given)."""
    vocab = len(tokenizer)
    words = vocab - len(tokenizer.all_special_ids)
    eos_logit = math.log(p_eos * words / (1 - p_eos))
    ids = tokenizer.get_vocab()

    def hook(module, inputs, logits):
        logits = torch.zeros_like(logits)
        logits[
            ..., tokenizer.all_special_ids
        ] = -1e4  # finite: log-probs at masked (pad) positions must stay 0 * finite
        logits[..., tokenizer.eos_token_id] = eos_logit
        for word, value in (boost or {}).items():
            logits[..., ids[word]] += value
        return logits

    return model.lm_head.register_forward_hook(hook)


PROMPTS = world.eval_prompts(16, seed=0)


def test_a_policy_against_itself(model, tokenizer):
    pairs = world.preference_pairs(8, seed=0, split="eval")
    m = evaluate(
        model,
        tokenizer,
        PROMPTS[:4],
        EvalConfig(num_samples=3, max_new_tokens=6),
        reference=copy.deepcopy(model),
        baseline=model,
        scorer=FunctionScorer(world.sentiment),
        pairs=pairs,
    )
    assert m["kl_to_reference"] == 0.0 and m["kl_tokenwise"] == pytest.approx(0.0, abs=1e-6)
    assert (
        m["preference_accuracy"] == 0.0 and m["win_rate"] == 0.5
    )  # every pair ties: a tie is not chosen and m["length_change"] == 0.0
    assert m["num_samples"] == 12 and 0.0 <= m["mean_score"] <= 1.0 and not m["kl_estimator_biased"]
    assert "KL(policy || reference)" in format_report(m) and "win rate" in format_report(m)


def test_kl_estimates_match_the_exact_kl(model, tokenizer):
    """Fixed next-token distributions: EOS with prob p (policy) or q (reference), else uniform words.

    Every position has the same KL, k = p log(p/q) + (1-p) log((1-p)/(1-q)), and a completion of at
    most T tokens has sum_{t<T} (1-p)^t positions on average, so KL(policy || reference) is their product.
    """
    p, q, T = 0.3, 0.6, 6
    policy, reference = model, copy.deepcopy(model)
    handles = [fix_distribution(policy, tokenizer, p), fix_distribution(reference, tokenizer, q)]
    try:
        m = evaluate(
            policy,
            tokenizer,
            PROMPTS[:8],
            EvalConfig(num_samples=32, max_new_tokens=T, seed=0),
            reference=reference,
            baseline=None,
        )
    finally:
        for h in handles:
            h.remove()
    per_position = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    exact = per_position * sum((1 - p) ** t for t in range(T))
    assert m["kl_tokenwise"] == pytest.approx(exact, rel=0.12)
    assert abs(m["kl_to_reference"] - exact) < 4 * m["kl_to_reference_sem"]
    assert m["kl_tokenwise_sem"] < m["kl_to_reference_sem"]  # the Rao-Blackwellised estimate is less noisy
    assert m["finished_share"] == pytest.approx(1 - (1 - p) ** T, abs=0.05)


def test_win_rate_length_change_and_preference_accuracy(model, tokenizer):
    reference = copy.deepcopy(model)
    handles = [
        fix_distribution(model, tokenizer, 0.2, boost={"great": 6.0}),
        fix_distribution(reference, tokenizer, 0.4),
    ]
    try:
        pairs = [
            {"prompt": "the film was", "chosen": " great", "rejected": " dull"},
            {"prompt": "the film was", "chosen": " dull", "rejected": " great"},
            {
                "prompt": [{"role": "user", "content": "the film was"}],
                "chosen": [{"role": "assistant", "content": "great"}],
                "rejected": [{"role": "assistant", "content": "dull"}],
            },
        ]
        assert preference_accuracy(model, reference, tokenizer, pairs[:1]) == 1.0
        assert preference_accuracy(model, reference, tokenizer, pairs) == pytest.approx(2 / 3)
        m = evaluate(
            model,
            tokenizer,
            PROMPTS,
            EvalConfig(num_samples=4, max_new_tokens=8),
            reference=reference,
            scorer=FunctionScorer(world.sentiment),
        )
    finally:
        for h in handles:
            h.remove()
    assert m["mean_score"] > m["baseline_mean_score"] + 0.2 and m["win_rate"] > 0.6
    assert m["length_change"] > 0 and m["mean_length"] > m["baseline_mean_length"]  # EOS is rarer in the policy
    assert m["kl_to_reference"] > 0.5


def test_pairwise_judge_win_rate(model, tokenizer):
    class LongerWins:
        name = "longer wins"

        def compare(self, prompts, a, b):
            return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]

    reference = copy.deepcopy(model)
    handles = [fix_distribution(model, tokenizer, 0.05), fix_distribution(reference, tokenizer, 0.6)]
    try:
        m = evaluate(
            model,
            tokenizer,
            PROMPTS[:8],
            EvalConfig(num_samples=2, max_new_tokens=8),
            reference=reference,
            judge=LongerWins(),
        )
    finally:
        for h in handles:
            h.remove()
    assert m["win_rate"] > 0.8 and m["win_rate_by"] == "longer wins"


def test_kl_to_reference_is_the_demo_function(model, tokenizer):
    from dpokit.online import demo_eval as demo_evaluate

    assert demo_evaluate.kl_to_reference is kl_to_reference and demo_evaluate.preference_accuracy is preference_accuracy
    samples = sample(model, tokenizer, PROMPTS[:2], num_samples=2, max_new_tokens=4)
    assert kl_to_reference(model, model, samples, tokenizer.pad_token_id) == 0.0
    ratios, tokenwise = log_ratios(
        model, model, [s.prompt_ids for s in samples], [s.completion_ids for s in samples], 0, tokenwise=True
    )
    assert ratios.shape == tokenwise.shape == (4,)


def test_cli_eval(tmp_path, capsys):
    import json

    from dpokit.cli import build_parser, main
    from tiny_assets import tiny_model_dir, write_jsonl

    if not any("eval" in (getattr(a, "choices", None) or {}) for a in build_parser()._actions):
        pytest.skip("needs the cli.py change that adds the eval verb (docs/pipeline.md)")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the film was"}, {"prompt": "it is"}])
    model = str(tiny_model_dir())
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--policy",
                model,
                "--reference",
                model,
                "--prompts",
                str(prompts),
                "--scorer",
                "dpokit.demo.world:sentiment",
                "-n",
                "2",
                "--max-new-tokens",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    assert (
        m["kl_to_reference"] == 0.0
        and m["preference_accuracy" if "preference_accuracy" in m else "win_rate"] is not None
    )
    assert m["num_samples"] == 4 and (tmp_path / "eval.samples.jsonl").exists()
    assert "KL(policy || reference)" in capsys.readouterr().out


def test_evaluate_takes_its_settings_from_one_eval_config(model, tokenizer):
    # Issue 23: evaluate() took 15 keyword arguments, five of them EvalConfig's fields under the same names; the
    # settings are now the EvalConfig (the pipeline passes its eval: section, dpokit eval the one its flags make).
    pairs = world.preference_pairs(5, seed=0, split="eval")
    cfg = EvalConfig(num_samples=2, max_new_tokens=3, temperature=0.7, top_p=0.9, seed=5, max_pairs=2)
    m = evaluate(model, tokenizer, PROMPTS[:3], cfg, reference=copy.deepcopy(model), baseline=None, pairs=pairs)
    assert (m["num_samples"], m["max_new_tokens"], m["temperature"], m["top_p"]) == (6, 3, 0.7, 0.9)
    assert m["pairs_used"] == 2 and m["pairs_total"] == 5 and m["kl_estimator_biased"]
    again = evaluate(model, tokenizer, PROMPTS[:3], cfg, baseline=None)
    assert again["examples"] == m["examples"]  # the seed is the config's: the same samples
    with pytest.raises(Exception, match="eval.max_pairs"):
        EvalConfig(max_pairs=0)
