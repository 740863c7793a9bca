"""Log-ratios of a policy to its reference: the KL estimates and the implicit-reward accuracy of `dpokit eval`.

Moved out of online/evaluation.py (which re-exports every name) so that module keeps to the evaluation itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dpokit.data.batching import to_device
from dpokit.data.collate import pad_completions
from dpokit.data.layouts import detect_layout, load_preferences, to_example
from dpokit.data.records import PreferenceExample
from dpokit.data.tokenization import render_ids
from dpokit.generation import Sample
from dpokit.logprobs import token_kl, token_logps
from dpokit.losses import preference_correct


# --- log-ratios and KL ---------------------------------------------------------------------------


@torch.no_grad()
def log_ratios(
    policy,
    reference,
    prompt_ids,
    completion_ids,
    pad_token_id: int,
    batch_size: int = 32,
    tokenwise: bool = False,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y|x) - log ref(y|x) per sequence (N,), and optionally the tokenwise KL along each y (N,).

    progress: a tqdm bar (or anything with update(n)), advanced by the rows of each batch.
    """
    device = next(policy.parameters()).device
    ratios, kls = [], []
    for start in range(0, len(prompt_ids), batch_size):
        rows = list(zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]))
        batch = to_device(pad_completions(rows, pad_token_id), device)
        ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        policy_logits = policy(input_ids=ids, attention_mask=attention).logits
        ref_logits = reference(input_ids=ids, attention_mask=attention).logits
        policy_logps, _ = token_logps(policy_logits, labels)
        ref_logps, _ = token_logps(ref_logits, labels)
        ratios.append((policy_logps.sum(-1) - ref_logps.sum(-1)).float().cpu())
        if tokenwise:
            kls.append(token_kl(policy_logits, ref_logits, labels).cpu())
        if progress is not None:
            progress.update(len(rows))
    if not ratios:
        return torch.zeros(0), (torch.zeros(0) if tokenwise else None)
    return torch.cat(ratios), (torch.cat(kls) if tokenwise else None)


def k3_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimates of KL(pi || ref) from log_ratio = log pi(y) - log ref(y), y ~ pi: (N,) -> (N,).

    k3 = (r - 1) - log r with r = ref(y) / pi(y) = exp(-log_ratio) (Schulman 2020, "Approximating KL
    divergence"). Its mean is unbiased, as the plain mean of log_ratio (k1) is, because E_pi[r - 1] = 0;
    unlike k1 every term is >= 0 (x - 1 >= log x), so the estimate is never negative. expm1 keeps
    the small-ratio terms (about log_ratio**2 / 2) exact; the clamp only removes rounding below 0.
    """
    log_ratio = log_ratio.double()
    return (torch.expm1(-log_ratio) + log_ratio).clamp_min(0.0)


KL_ESTIMATOR = (
    "k3: mean over the policy's samples of (r - 1) - log r, r = ref(y|x) / pi(y|x) (Schulman 2020; unbiased, >= 0)"
)


def kl_to_reference(policy, reference, samples: Sequence[Sample], pad_token_id: int, progress=None) -> float:
    """Monte-Carlo KL(policy || reference) in nats per completion, from the policy's own samples.

    KL = E_{y ~ pi}[log pi(y|x) - log ref(y|x)], estimated with k3 (`k3_kl`: unbiased and never
    negative); the samples must come from the policy at temperature 1 and top_p 1 for this to be
    unbiased. The EOS is part of y. It is exactly 0 when the two models are the same.
    """
    if not samples:
        return float("nan")
    ratios, _ = log_ratios(
        policy,
        reference,
        [s.prompt_ids for s in samples],
        [s.completion_ids for s in samples],
        pad_token_id,
        progress=progress,
    )
    return k3_kl(ratios).mean().item()


# --- held-out preference accuracy ---------------------------------------------------------------


def examples_of(pairs) -> list:
    """Preference rows (dicts in any layout, PreferenceExamples) or a data file -> PreferenceExamples."""
    if isinstance(pairs, (str, Path)):
        return load_preferences(str(pairs))[0]
    out = []
    for i, row in enumerate(pairs):
        if isinstance(row, PreferenceExample):
            out.append(row)
        else:
            out.append(to_example(dict(row), detect_layout(row) or "prompt_chosen_rejected", None, f"pairs:{i + 1}"))
    return out


def preference_accuracy(policy, reference, tokenizer, pairs, progress=None) -> float:
    """Share of pairs whose chosen completion gets the strictly higher implicit reward; a tie counts as not chosen (0).

    The one definition of training's rewards/accuracies (`losses.preference_correct`, as TRL counts). DPO's implicit
    reward is beta * log(pi/ref); beta > 0 does not change the ordering, so it is left out. Completions are
    tokenised exactly as for training (`tokenization.render_ids`: prompt + completion + EOS, or the chat template).
    A policy equal to its reference ties on every pair and scores exactly 0. progress: a bar advanced by 2 per pair
    (chosen, rejected).
    """
    examples = examples_of(pairs)
    if not examples:
        return float("nan")
    prompts, chosen, rejected = zip(*(render_ids(ex, tokenizer) for ex in examples))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen_ratio = log_ratios(policy, reference, list(prompts), list(chosen), pad, progress=progress)[0]
    rejected_ratio = log_ratios(policy, reference, list(prompts), list(rejected), pad, progress=progress)[0]
    return preference_correct(chosen_ratio, rejected_ratio).mean().item()
