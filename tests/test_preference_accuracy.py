"""One definition of preference accuracy (issue 23): training's rewards/accuracies and dpokit eval's
preference_accuracy count a pair as correct when chosen > rejected strictly; a tie counts 0 (as TRL)."""

from __future__ import annotations

import copy

import torch

from dpokit.config import load_config
from dpokit.data.collate import collate_pairs
from dpokit.data.records import PreferenceExample
from dpokit.data.tokenization import tokenize_pairs
from dpokit.losses import preference_correct
from dpokit.online.evaluation import preference_accuracy
from dpokit.steps.base import StepContext
from dpokit.steps.paired import forward_pairs
from dpokit.tiny import build_tiny_llama
from tiny_assets import synthetic_pairs, tiny_model_dir, word_tokenizer


def test_a_tie_is_not_chosen():
    assert preference_correct(torch.tensor([1.0, 0.0, -2.0, 0.5]), torch.tensor([0.0, 0.0, -1.0, 0.5])).tolist() == [
        1,
        0,
        0,
        0,
    ]


def _training_accuracy(policy, reference, examples) -> float:
    cfg = load_config(None, {"model.name_or_path": str(tiny_model_dir()), "loss.beta": 0.5})
    pairs, _ = tokenize_pairs(examples, word_tokenizer(), max_length=32, max_prompt_length=16)
    with torch.no_grad():
        _, metrics = forward_pairs(policy, reference, collate_pairs(pairs, 0), StepContext(cfg))
    return metrics["rewards/accuracies"].mean().item()


def test_training_and_eval_give_the_same_accuracy_ties_included():
    tokenizer = word_tokenizer()
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in synthetic_pairs(12, seed=0)]
    policy = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    same = copy.deepcopy(policy)  # the reference equals the policy: every pair ties
    assert preference_accuracy(policy, same, tokenizer, examples) == 0.0 == _training_accuracy(policy, same, examples)
    other = build_tiny_llama(
        tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1
    )  # no ties: some right, some wrong
    eval_accuracy = preference_accuracy(policy, other, tokenizer, examples)
    assert 0 < eval_accuracy < 1 and abs(eval_accuracy - _training_accuracy(policy, other, examples)) < 1e-6
