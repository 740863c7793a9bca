"""One [chosen; rejected] batch through the policy (and the reference) -> per-pair losses and metrics.

This is the paired (DPO-family) step the training loop calls for every
micro-batch and for evaluation; the unpaired KTO step lives in kto_step.py.

Two implementations of the same step:
  forward_pairs       the plain path: a collate_pairs batch (2B padded rows), full logits
  forward_pairs_fast  a make_collate batch (data/packing.py: padding-free rows, prompt shared by
                      chosen and rejected), the LM head applied chunk by chunk to the scored tokens only
                      (logprobs.ChunkedLMHeadLogps), reference log-probs from the batch when they are
                      cached on disk (ref_cache.py); same losses, gradients and metrics
                      (tests/test_fast_paths.py). Settings: config `speed:` (config.SpeedConfig), docs/performance.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.config import Config, SpeedConfig
from dpokit.data.packing import Layout, collate_packed
from dpokit.logprobs import (
    IGNORE_INDEX,
    auto_chunk_size,
    chunked_token_logps,
    gathered_token_logps,
    token_kl,
    token_logps,
    token_entropy_top1,
    token_sq_prob_logsumexp,
)
from dpokit.losses import PairLogps, compute_loss, shared_prefix_logps
from dpokit.model import reference_mode
from dpokit.packed_attention import ATTENTION_NAME, attention_inputs, is_flash, supports_prefix_sharing


def _halves(x: torch.Tensor | None, n: int) -> tuple:
    """(chosen, rejected) halves of a (2B,) [chosen; rejected] tensor; (None, None) for None."""
    return (None, None) if x is None else (x[:n], x[n:])


def _score_pairs(logps, lengths, ref_logps, shared, ref_shared, wpo, mean_logits, cfg: Config) -> tuple:
    """(2B,) [chosen; rejected] per-sequence sums -> (LossOutput, the TRL-named per-pair metrics).

    shared / ref_shared: LD-DPO shared-prefix sums (None unless loss.ld_alpha); wpo: the WPO
    weights' per-sequence sums (None unless loss.use_weighting); mean_logits: vocabulary-mean logit per
    completion token, averaged per sequence.
    """
    n = logps.shape[0] // 2
    pair = PairLogps(*_halves(logps, n), *_halves(ref_logps, n), *_halves(lengths, n))
    pair.policy_chosen_shared, pair.policy_rejected_shared = _halves(shared, n)
    pair.ref_chosen_shared, pair.ref_rejected_shared = _halves(ref_shared, n)
    pair.policy_chosen_wpo, pair.policy_rejected_wpo = _halves(wpo, n)
    out = compute_loss(pair, cfg.loss)
    with torch.no_grad():
        metrics = {
            "loss": out.losses.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": pair.policy_chosen.detach(),
            "logps/rejected": pair.policy_rejected.detach(),
            "logits/chosen": mean_logits[:n],
            "logits/rejected": mean_logits[n:],
        }
    return out, metrics


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
    shared = ref_shared = wpo = None
    if cfg.loss.ld_alpha is not None:  # LD-DPO: log-probs over the length both completions share
        shared = shared_prefix_logps(tok_logps, mask)
        ref_shared = None if ref_tok_logps is None else shared_prefix_logps(ref_tok_logps, mask)
    with torch.no_grad():
        if cfg.loss.use_weighting:  # WPO: sum_t [log pi(y_t) - log sum_v pi(v)^2], no gradient
            wpo = (tok_logps - token_sq_prob_logsumexp(logits) * mask).sum(-1)
        completion = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)  # (2B, T-1, 1)
        mean_logits = (logits[:, :-1].float() * completion).sum((1, 2)) / (completion.sum((1, 2)) * logits.shape[-1])
        entropy, top1 = token_entropy_top1(logits, labels)
    out, metrics = _score_pairs(logps, lengths, ref_logps, shared, ref_shared, wpo, mean_logits, cfg)
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


def fast_path_blocker(model) -> str | None:
    """Why the fast step cannot run this model (None: it can).

    Packed rows and prefix sharing reach attention through transformers' attention interface
    (keyword arguments passed down to a registered attention function); models that do not use
    it (older or remote-code architectures) would silently attend across pairs, so they take
    the plain step instead.
    """
    lm = _causal_lm(model)
    name = type(lm).__name__
    compatible = getattr(type(lm), "is_backend_compatible", None)
    if compatible is None or not compatible():
        return f"{name} does not use transformers' attention interface"
    if not isinstance(getattr(lm, getattr(lm, "base_model_prefix", ""), None), torch.nn.Module):
        return f"{name} has no backbone module at `{getattr(lm, 'base_model_prefix', '')}`"
    return None


def layout_for(speed: SpeedConfig, attn_implementation: str | None = None) -> Layout:
    """The row layout for these settings.

    sdpa (the default, attention per unit): pack_length 0 puts the whole micro-batch in one row, no
    padding at all; eager/flex build a dense mask, so rows stay as short as the longest unit there;
    flash-attention gets one varlen row and no prefix sharing.
    """
    if is_flash(attn_implementation):
        return Layout(packing=True, prefix_sharing=False, single_row=True)
    segment_attention = attn_implementation in (None, "sdpa", ATTENTION_NAME)
    return Layout(packing=speed.packing, prefix_sharing=speed.prefix_sharing and supports_prefix_sharing(attn_implementation),
                  pack_length=speed.pack_length, single_row=speed.packing and speed.pack_length == 0 and segment_attention)


def make_collate(speed: SpeedConfig, attn_implementation: str | None = None):
    """(pairs, pad_token_id) -> batch for forward_pairs_fast; cached reference log-probs ride along when pairs carry them."""
    layout = layout_for(speed, attn_implementation)

    def collate(pairs, pad_token_id: int) -> dict:
        batch = collate_packed(pairs, pad_token_id, layout)
        refs = [getattr(p, "reference", None) for p in pairs]
        if refs and all(r is not None for r in refs):
            ref = torch.tensor(refs, dtype=torch.float32)  # (B, 4): chosen, rejected, chosen_shared, rejected_shared
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
            batch["ref_shared_logps"] = torch.cat([ref[:, 2], ref[:, 3]])
        return batch

    return collate


def _causal_lm(model):
    """The *ForCausalLM module inside DDP/FSDP wrappers and a PEFT model."""
    m = model
    while isinstance(getattr(m, "module", None), torch.nn.Module):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _plain_linear_head(lm):
    """The LM head if it is a plain nn.Linear applied as is (no LoRA on it, no logit scaling/softcapping), else None."""
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


def _usable(weight: torch.Tensor) -> bool:
    """A plain, materialised weight (not an FSDP/ZeRO-3 shard or a DTensor outside its module's forward)."""
    sharded = hasattr(weight, "full_tensor") or hasattr(weight, "ds_id")  # FSDP2 DTensor, DeepSpeed ZeRO-3
    return not sharded and weight.dim() == 2 and weight.numel() > 0


@contextlib.contextmanager
def _scoring_forward(lm, score):
    """The causal LM's forward, for the duration: backbone, then `score(hidden (N, L, H))` instead of the LM head.

    The model is still called through every wrapper (DDP, FSDP, PEFT, Accelerate), so gradient
    synchronisation, parameter gathering, adapters and autocast work as in its normal forward, and
    the LM head runs inside that forward; only the (N, L, V) logits are never built.
    """
    backbone = getattr(lm, lm.base_model_prefix)

    def forward(*args, **kwargs):
        for name in ("labels", "output_attentions", "output_hidden_states", "return_dict", "logits_to_keep", "task_ids"):
            kwargs.pop(name, None)
        return score(backbone(*args, **kwargs).last_hidden_state)

    missing = object()
    previous = lm.__dict__.get("forward", missing)
    lm.forward = forward
    try:
        yield
    finally:
        if previous is missing:
            del lm.__dict__["forward"]
        else:
            lm.forward = previous


@dataclass
class TokenScores:
    """Per scored token: log-prob (with grad when the model has it), statistics, and a way back to its logits."""

    logp: torch.Tensor  # (M,) float32
    stats: torch.Tensor | None  # (M, 3) vocabulary mean of the logits, entropy, top-1 hit (0/1); no grad
    log_sum_sq_probs: torch.Tensor | None  # (M,) log sum_v p(v)^2 (WPO), no grad
    logits_of: object  # index (k,) -> (k, V) logits, no grad (for the KL metric); None when not available
    vocab_size: int


def score_tokens(model, batch: dict, speed: SpeedConfig, want_stats: bool = False, want_sq: bool = False) -> TokenScores:
    """Run `model` on a collate_packed batch -> log-probs of every scored completion token.

    chunked_logps: the hidden states of the scored tokens go through ChunkedLMHeadLogps;
    otherwise through the LM head module, (M, V) logits for the scored tokens only. A head dpokit
    cannot apply itself (LoRA on lm_head, logit scaling or softcapping) takes the model's own
    forward and full logits.
    """
    lm = _causal_lm(model)
    head = _plain_linear_head(lm)
    dtype = next(lm.parameters()).dtype
    inputs = attention_inputs(lm.config, batch, dtype)
    pos, target = batch["score_pos"], batch["score_target"]
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, pos)
        logp, stats, sq = gathered_token_logps(logits, target, want_stats, want_sq)
        detached = logits.detach()
        return TokenScores(logp, stats, sq, lambda idx: detached.index_select(0, idx).float(), logits.shape[-1])
    kept = {}

    def score(hidden):
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)  # (M, H)
        weight, bias = head.weight, head.bias
        if speed.chunked_logps:
            if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
                weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
            out = chunked_token_logps(hidden, weight, bias, target, speed.logps_chunk_size, want_stats, want_sq)
            kept["hidden"] = hidden.detach()
        else:
            logits = head(hidden)  # the module itself, so wrappers' hooks (ZeRO-3 gathering) run
            out = gathered_token_logps(logits, target, want_stats, want_sq)
            kept["logits"] = logits.detach()
        return tuple(x if x is not None else hidden.new_zeros(0) for x in out)

    with _scoring_forward(lm, score):
        logp, stats, sq = model(**inputs, use_cache=False)
    stats = stats if want_stats else None
    sq = sq if want_sq else None
    if "logits" in kept:
        logits_of = lambda idx: kept["logits"].index_select(0, idx).float()  # noqa: E731
    elif _usable(head.weight):
        weight, bias = head.weight, head.bias

        def logits_of(idx):
            with torch.no_grad():
                return F.linear(kept["hidden"].index_select(0, idx).to(weight.dtype), weight, bias).float()
    else:
        logits_of = None  # a sharded head outside its forward: no KL metric
    return TokenScores(logp, stats, sq, logits_of, head.out_features)


def per_sequence(values: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Sums of per-token `values` (M,) per sequence `seq` (M,) -> (n_seq,)."""
    return torch.zeros(n_seq, dtype=values.dtype, device=values.device).index_add(0, seq, values)


def _shared_mask(batch: dict) -> torch.Tensor:
    """(M,) True for tokens within the first min(|chosen|, |rejected|) scored tokens of their pair (LD-DPO)."""
    lengths = batch["seq_lengths"]
    chosen_len, rejected_len = lengths.chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2)
    return batch["score_ordinal"] <= shared[batch["score_seq"]]


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


@torch.no_grad()
def reference_sequence_logps(model, batch: dict, speed: SpeedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs (2B,), LD-DPO shared-prefix sums (2B,)) of one batch, no gradient."""
    n_seq = batch["seq_lengths"].shape[0]
    scores = score_tokens(model, batch, speed)
    seq = batch["score_seq"]
    return per_sequence(scores.logp, seq, n_seq), per_sequence(scores.logp * _shared_mask(batch), seq, n_seq)


def forward_pairs_fast(policy, reference, batch: dict, cfg: Config, with_reference: bool) -> tuple:
    """forward_pairs on a collate_packed batch (make_collate); reference log-probs from the batch when cached.

    returns (LossOutput, metrics: dict name -> (B,) tensor), the same names and values as forward_pairs;
    kl/chosen only when a live reference runs (a cached reference has no next-token distributions).
    """
    speed = cfg.speed
    seq, lengths = batch["score_seq"], batch["seq_lengths"]
    n_seq = lengths.shape[0]
    n_pairs = n_seq // 2
    scores = score_tokens(policy, batch, speed, want_stats=True, want_sq=cfg.loss.use_weighting)
    logps = per_sequence(scores.logp, seq, n_seq)
    ref_logps = ref_shared = ref_scores = None
    if with_reference:
        if "ref_logps" in batch:
            ref_logps, ref_shared = batch["ref_logps"], batch["ref_shared_logps"]
        else:
            with reference_mode(policy, reference) as ref_model:
                ref_scores = score_tokens(ref_model, batch, speed)
            ref_logps = per_sequence(ref_scores.logp, seq, n_seq)
            ref_shared = per_sequence(ref_scores.logp * _shared_mask(batch), seq, n_seq)
    shared = wpo = None
    if cfg.loss.ld_alpha is not None:
        shared = per_sequence(scores.logp * _shared_mask(batch), seq, n_seq)
    with torch.no_grad():
        if cfg.loss.use_weighting:
            wpo = per_sequence(scores.logp.detach() - scores.log_sum_sq_probs, seq, n_seq)
        mean_logits = per_sequence(scores.stats[:, 0], seq, n_seq) / lengths
        order = batch["score_order"]  # forward_pairs' token order
        entropy, top1 = scores.stats[order, 1], scores.stats[order, 2]
    out, metrics = _score_pairs(logps, lengths, ref_logps, shared, ref_shared if cfg.loss.ld_alpha is not None else None, wpo,
                                mean_logits, cfg)
    metrics.update(entropy=entropy, mean_token_accuracy=top1[: int(lengths[:n_pairs].sum())])
    if ref_scores is not None and scores.logits_of is not None and ref_scores.logits_of is not None:
        chosen_idx = torch.nonzero(seq < n_pairs).squeeze(-1)
        kl = _chunked_kl(scores, ref_scores, chosen_idx, speed.logps_chunk_size)
        metrics["kl/chosen"] = per_sequence(kl, seq.index_select(0, chosen_idx), n_pairs)
    return out, metrics
