"""The paired (DPO-family) step: one [chosen; rejected] batch through the policy (and the reference) -> per-pair losses and metrics.

Two implementations of the same step (the unpaired KTO step is steps/unpaired.py):
  PairedStep      forward_pairs: a collate_pairs batch (2B padded rows), full logits
  FastPairedStep  forward_pairs_fast: a make_collate batch (data/packing.py: padding-free rows,
                  prompt shared by chosen and rejected), the LM head applied chunk by chunk to the
                  scored tokens only (steps/token_scores.py), reference log-probs from the batch when
                  they are cached on disk (ref_cache/); same losses, gradients and metrics
                  (tests/test_fast_paths.py). Settings: config `speed:` (config.SpeedConfig), docs/performance.md.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dpokit.config import Config, SpeedConfig
from dpokit.data.collate import IGNORE_INDEX, attach_cached_reference, collate_pairs
from dpokit.data.packing import collate_packed, count_pairs
from dpokit.data.prepare import prepare_data
from dpokit.data.vision import vision_inputs
from dpokit.logprobs import auto_chunk_size, token_entropy_top1, token_kl, token_logps, token_sq_prob_logsumexp
from dpokit.losses import PairLogps, compute_loss, preference_correct, shared_prefix_logps
from dpokit.losses.base import log_ratios
from dpokit.reference import reference_mode
from dpokit.steps.base import Step, StepContext
from dpokit.steps.router_aux import add_router_aux, packed_token_weights, recording, router_for
from dpokit.steps.token_scores import (
    TokenScores,
    fast_attention_for,
    layout_for,
    per_sequence,
    score_tokens,
    shared_mask,
)


def _halves(x: torch.Tensor | None, n: int) -> tuple:
    """(chosen, rejected) halves of a (2B,) [chosen; rejected] tensor; (None, None) for None."""
    return (None, None) if x is None else (x[:n], x[n:])


def _score_pairs(logps, lengths, ref_logps, shared, ref_shared, wpo, mean_logits, ctx: StepContext) -> tuple:
    """(2B,) [chosen; rejected] per-sequence sums -> (LossOutput, the TRL-named per-pair metrics).

    shared / ref_shared: LD-DPO shared-prefix sums (None unless loss.ld_alpha); wpo: the WPO
    weights' per-sequence sums (None unless loss.use_weighting); mean_logits: vocabulary-mean logit per
    completion token, averaged per sequence. ctx.beta (loss.beta_schedule=adaptive, steps/beta.py): the pairs'
    reward margins M_i = beta_0 * (r_w - r_l) (B,) give the beta of this batch's loss; the rewards stay at
    beta_0 = loss.beta, and the beta used is logged as `beta`.
    """
    cfg, adaptive = ctx.cfg, ctx.beta
    n = logps.shape[0] // 2
    pair = PairLogps(*_halves(logps, n), *_halves(ref_logps, n), *_halves(lengths, n))
    pair.policy_chosen_shared, pair.policy_rejected_shared = _halves(shared, n)
    pair.ref_chosen_shared, pair.ref_rejected_shared = _halves(ref_shared, n)
    pair.policy_chosen_wpo, pair.policy_rejected_wpo = _halves(wpo, n)
    beta = cfg.loss.beta
    if adaptive is not None:  # beta-DPO: this batch's beta from its margins (steps/beta.py)
        chosen_ratio, rejected_ratio = log_ratios(pair, cfg.loss)
        beta = adaptive.batch_beta((cfg.loss.beta * (chosen_ratio - rejected_ratio)).detach(), ctx)
    out = compute_loss(pair, cfg.loss if adaptive is None else dataclasses.replace(cfg.loss, beta=beta))
    if adaptive is not None:
        out.chosen_rewards, out.rejected_rewards = (
            (cfg.loss.beta * chosen_ratio).detach(),
            (cfg.loss.beta * rejected_ratio).detach(),
        )
    with torch.no_grad():
        metrics = {
            "loss": out.losses.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": preference_correct(out.chosen_rewards, out.rejected_rewards),  # a tie is 0
            "logps/chosen": pair.policy_chosen.detach(),
            "logps/rejected": pair.policy_rejected.detach(),
            "logits/chosen": mean_logits[:n],
            "logits/rejected": mean_logits[n:],
        }
        if adaptive is not None:
            metrics["beta"] = torch.full((n,), float(beta), device=logps.device)
    return out, metrics


def forward_pairs(policy, reference, batch: dict, ctx: StepContext) -> tuple:
    """Policy (and reference, when ctx.with_reference) log-probs of one [chosen; rejected] batch -> loss output and metrics.

    returns (LossOutput, metrics: dict name -> (B,) tensor of per-pair values)
    """
    cfg, with_reference = ctx.cfg, ctx.with_reference
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (2B, T)
    n_pairs = input_ids.shape[0] // 2
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        **vision_inputs(batch),
    }  # + pixel_values of image rows
    router = router_for(policy, cfg.loss)  # None for a dense model
    with recording(policy, router) as router_logits:
        logits = policy(**inputs, use_cache=False).logits  # (2B, T, V)
    tok_logps, mask = token_logps(logits, labels)  # (2B, T-1)
    logps, lengths = tok_logps.sum(-1), mask.sum(-1)  # (2B,)
    ref_logps = ref_logits = ref_tok_logps = None
    if with_reference and "ref_logps" in batch:  # cached reference log-probs (the image step's batches carry them)
        ref_logps = batch["ref_logps"]
    elif with_reference:
        with reference_mode(policy, reference) as ref_model:
            ref_logits = ref_model(**inputs, use_cache=False).logits
            ref_tok_logps, _ = token_logps(ref_logits, labels)
            ref_logps = ref_tok_logps.sum(-1)
    shared = ref_shared = wpo = None
    if cfg.loss.ld_alpha is not None:  # LD-DPO: log-probs over the length both completions share
        shared = shared_prefix_logps(tok_logps, mask)
        ref_shared = None if ref_tok_logps is None else shared_prefix_logps(ref_tok_logps, mask)
        if "ref_shared_logps" in batch:
            ref_shared = batch["ref_shared_logps"]
    with torch.no_grad():
        if cfg.loss.use_weighting:  # WPO: sum_t [log pi(y_t) - log sum_v pi(v)^2], no gradient
            wpo = (tok_logps - token_sq_prob_logsumexp(logits) * mask).sum(-1)
        completion = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)  # (2B, T-1, 1)
        mean_logits = (logits[:, :-1].float() * completion).sum((1, 2)) / (completion.sum((1, 2)) * logits.shape[-1])
        entropy, top1 = token_entropy_top1(logits, labels)
    out, metrics = _score_pairs(logps, lengths, ref_logps, shared, ref_shared, wpo, mean_logits, ctx)
    add_router_aux(router, router_logits, attention_mask, out, metrics)  # MoE: + coef * aux_loss per pair
    # per completion token, [chosen; rejected] row by row: averaged over tokens, as TRL does
    metrics.update(entropy=entropy, mean_token_accuracy=top1[: int(mask[:n_pairs].sum())])
    if ref_logits is not None:
        with torch.no_grad():
            metrics["kl/chosen"] = token_kl(logits[:n_pairs].detach(), ref_logits[:n_pairs], labels[:n_pairs])
    return out, metrics


# ---------------------------------------------------------------------------------------------
# The fast paired step: padding-free rows, prompt shared by chosen and rejected, chunked LM head,
# reference log-probs from the on-disk cache. Same loss, gradients and metrics as forward_pairs.
# ---------------------------------------------------------------------------------------------


def make_collate(speed: SpeedConfig, attn_implementation: str | None = None):
    """(pairs, pad_token_id) -> batch for forward_pairs_fast; cached reference log-probs ride along when pairs carry them."""
    layout = layout_for(speed, attn_implementation)

    def collate(pairs, pad_token_id: int) -> dict:
        return attach_cached_reference(collate_packed(pairs, pad_token_id, layout), pairs)

    return collate


@torch.no_grad()
def _chunked_kl(policy: TokenScores, ref: TokenScores, idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """KL(policy || reference) of the next-token distributions at scored tokens `idx` -> (k,)."""
    out = torch.empty(idx.shape[0], dtype=torch.float32, device=idx.device)
    chunk = auto_chunk_size(policy.vocab_size, chunk_size)
    for s in range(0, idx.shape[0], chunk):
        part = idx[s : s + chunk]
        p = F.log_softmax(policy.logits_of(part), dim=-1)
        q = F.log_softmax(ref.logits_of(part), dim=-1)
        out[s : s + chunk] = (p.exp() * (p - q)).sum(-1)
    return out


def forward_pairs_fast(policy, reference, batch: dict, ctx: StepContext) -> tuple:
    """forward_pairs on a collate_packed batch (make_collate); reference log-probs from the batch when cached.

    returns (LossOutput, metrics: dict name -> (B,) tensor), the same names and values as forward_pairs;
    kl/chosen only when a live reference runs (a cached reference has no next-token distributions).
    """
    cfg, with_reference = ctx.cfg, ctx.with_reference
    speed, attention = cfg.speed, fast_attention_for(cfg)  # the backend make_collate laid the rows out for
    seq, lengths = batch["score_seq"], batch["seq_lengths"]
    n_seq = lengths.shape[0]
    n_pairs = n_seq // 2
    router = router_for(policy, cfg.loss)  # None for a dense model
    with recording(policy, router) as router_logits:
        scores = score_tokens(
            policy, batch, speed, want_stats=True, want_sq=cfg.loss.use_weighting, attention=attention
        )
    logps = per_sequence(scores.logp, seq, n_seq)
    ref_logps = ref_shared = ref_scores = None
    if with_reference:
        if "ref_logps" in batch:
            ref_logps, ref_shared = batch["ref_logps"], batch["ref_shared_logps"]
        else:
            with reference_mode(policy, reference) as ref_model:
                ref_scores = score_tokens(ref_model, batch, speed, attention=attention)
            ref_logps = per_sequence(ref_scores.logp, seq, n_seq)
            ref_shared = per_sequence(ref_scores.logp * shared_mask(batch), seq, n_seq)
    shared = wpo = None
    if cfg.loss.ld_alpha is not None:
        shared = per_sequence(scores.logp * shared_mask(batch), seq, n_seq)
    with torch.no_grad():
        if cfg.loss.use_weighting:
            wpo = per_sequence(scores.logp.detach() - scores.log_sum_sq_probs, seq, n_seq)
        mean_logits = per_sequence(scores.stats[:, 0], seq, n_seq) / lengths
        order = batch["score_order"]  # forward_pairs' token order
        entropy, top1 = scores.stats[order, 1], scores.stats[order, 2]
    out, metrics = _score_pairs(
        logps, lengths, ref_logps, shared, ref_shared if cfg.loss.ld_alpha is not None else None, wpo, mean_logits, ctx
    )
    add_router_aux(
        router, router_logits, packed_token_weights(batch), out, metrics
    )  # a shared prompt weighs 2, padding 0
    metrics.update(entropy=entropy, mean_token_accuracy=top1[: int(lengths[:n_pairs].sum())])
    if ref_scores is not None and scores.logits_of is not None and ref_scores.logits_of is not None:
        chosen_idx = torch.nonzero(seq < n_pairs).squeeze(-1)
        kl = _chunked_kl(scores, ref_scores, chosen_idx, speed.logps_chunk_size)
        metrics["kl/chosen"] = per_sequence(kl, seq.index_select(0, chosen_idx), n_pairs)
    return out, metrics


def pair_tokens(pair) -> int:
    """Tokens of a pair's two rows, prompt + chosen and prompt + rejected (TRL's DPO `num_tokens`: the prompt twice)."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


class PairedStep(Step):
    """The plain paired step, with a live reference."""

    def prepare(self, cfg: Config, tokenizer):
        return prepare_data(cfg, tokenizer)

    def collate(self, pairs: list, pad_token_id: int) -> dict:
        return collate_pairs(pairs, pad_token_id)

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def tokens(self, pair) -> int:
        return pair_tokens(pair)

    def forward(self, policy, reference, batch: dict, ctx: StepContext) -> tuple:
        return forward_pairs(policy, reference, batch, ctx)


class FastPairedStep(PairedStep):
    """The paired step on padding-free rows with shared prompts and the chunked LM head; reference log-probs may be cached."""

    reads_reference_cache = True

    def __init__(self, speed: SpeedConfig, attn_implementation: str | None = None) -> None:
        self._collate = make_collate(speed, attn_implementation)

    def collate(self, pairs: list, pad_token_id: int) -> dict:
        return self._collate(pairs, pad_token_id)

    def count(self, batch: dict) -> int:
        return count_pairs(batch)

    def forward(self, policy, reference, batch: dict, ctx: StepContext) -> tuple:
        return forward_pairs_fast(policy, reference, batch, ctx)

    def plain(self) -> Step:
        return PairedStep()
