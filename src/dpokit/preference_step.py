"""One [chosen; rejected] batch through the policy (and the reference) -> per-pair losses and metrics.

This is the paired (DPO-family) step the training loop calls for every
micro-batch and for evaluation; the unpaired KTO step lives in kto_step.py.
"""

from __future__ import annotations

import torch

from dpokit.config import Config
from dpokit.logprobs import IGNORE_INDEX, token_kl, token_logps, token_sq_prob_logsumexp
from dpokit.losses import PairLogps, compute_loss, shared_prefix_logps
from dpokit.model import reference_mode


def forward_pairs(policy, reference, batch: dict, cfg: Config, with_reference: bool) -> tuple:
    """Policy (and reference) log-probs of one [chosen; rejected] batch -> loss output and metrics.

    returns (LossOutput, metrics: dict name -> (B,) tensor of per-pair values)
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (2B, T)
    n_pairs = input_ids.shape[0] // 2
    logits = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (2B, T, V)
    tok_logps, mask = token_logps(logits, labels)  # (2B, T-1)
    logps, lengths = tok_logps.sum(-1), mask.sum(-1)  # (2B,)
    ref_logps = ref_logits = ref_tok_logps = None
    if with_reference:
        with reference_mode(policy, reference) as ref_model:
            ref_logits = ref_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            ref_tok_logps, _ = token_logps(ref_logits, labels)
            ref_logps = ref_tok_logps.sum(-1)
    pair = PairLogps(
        policy_chosen=logps[:n_pairs],
        policy_rejected=logps[n_pairs:],
        ref_chosen=None if ref_logps is None else ref_logps[:n_pairs],
        ref_rejected=None if ref_logps is None else ref_logps[n_pairs:],
        chosen_lengths=lengths[:n_pairs],
        rejected_lengths=lengths[n_pairs:],
    )
    if cfg.loss.ld_alpha is not None:  # LD-DPO: log-probs over the length both completions share
        shared = shared_prefix_logps(tok_logps, mask)
        pair.policy_chosen_shared, pair.policy_rejected_shared = shared[:n_pairs], shared[n_pairs:]
        if ref_tok_logps is not None:
            ref_shared = shared_prefix_logps(ref_tok_logps, mask)
            pair.ref_chosen_shared, pair.ref_rejected_shared = ref_shared[:n_pairs], ref_shared[n_pairs:]
    if cfg.loss.use_weighting:  # WPO: sum_t [log pi(y_t) - log sum_v pi(v)^2], no gradient
        with torch.no_grad():
            wpo = (tok_logps - token_sq_prob_logsumexp(logits) * mask).sum(-1)
        pair.policy_chosen_wpo, pair.policy_rejected_wpo = wpo[:n_pairs], wpo[n_pairs:]
    out = compute_loss(pair, cfg.loss)
    with torch.no_grad():
        completion = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)  # (2B, T-1, 1)
        mean_logits = (logits[:, :-1].float() * completion).sum((1, 2)) / (completion.sum((1, 2)) * logits.shape[-1])
        metrics = {
            "loss": out.losses.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": pair.policy_chosen.detach(),
            "logps/rejected": pair.policy_rejected.detach(),
            "logits/chosen": mean_logits[:n_pairs],
            "logits/rejected": mean_logits[n_pairs:],
        }
        if ref_logits is not None:
            metrics["kl/chosen"] = token_kl(logits[:n_pairs].detach(), ref_logits[:n_pairs], labels[:n_pairs])
    return out, metrics
