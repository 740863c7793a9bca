"""A model's log-probs at the scored tokens of a padding-free batch, without a (tokens x vocab) logits tensor.

The fast steps (paired, sft) and the reference cache build all score tokens here:
`score_tokens` runs the model's backbone through every wrapper (DDP, FSDP, PEFT, Accelerate)
and applies the LM head only at the completion positions of a `data.packing` batch, chunk by
chunk with `speed.chunked_logps` (logprobs.ChunkedLMHeadLogps). `fast_path_blocker` says when a
model cannot take these rows (it would attend across packed pairs), `layout_for` which row
layout the settings and attention backend give.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.config import Config, SpeedConfig
from dpokit.data.packing import Layout
from dpokit.logprobs import chunked_token_logps, gathered_token_logps
from dpokit.packed_attention import ATTENTION_NAME, attention_inputs, fast_attention, is_flash, supports_prefix_sharing

_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(cfg: Config) -> torch.dtype | None:
    """The dtype matmuls run in: bf16/fp16 from model.dtype or train.mixed_precision, float32, or None ("auto": unknown before loading)."""
    if cfg.train.mixed_precision in _HALF:
        return _HALF[cfg.train.mixed_precision]
    if cfg.model.dtype in _HALF:
        return _HALF[cfg.model.dtype]
    return None if cfg.model.dtype == "auto" else torch.float32


def fast_attention_for(cfg: Config) -> str:
    """The attention implementation this config's fast step lays its rows out for and runs (packed_attention.fast_attention)."""
    return fast_attention(cfg.speed.attention, cfg.model.attn_implementation, compute_dtype(cfg))


def fast_path_blocker(model) -> str | None:
    """Why the fast step cannot run this model (None: it can).

    Packed rows and prefix sharing reach attention through transformers' attention interface
    (keyword arguments passed down to a registered attention function); models that do not use
    it (older or remote-code architectures) would silently attend across pairs, so they take
    the plain step instead.
    """
    lm = causal_lm(model)
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
    return Layout(
        packing=speed.packing,
        prefix_sharing=speed.prefix_sharing and supports_prefix_sharing(attn_implementation),
        pack_length=speed.pack_length,
        single_row=speed.packing and speed.pack_length == 0 and segment_attention,
    )


def causal_lm(model):
    """The *ForCausalLM module inside DDP/FSDP wrappers and a PEFT model."""
    m = model
    while isinstance(getattr(m, "module", None), torch.nn.Module):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


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
        for name in (
            "labels",
            "output_attentions",
            "output_hidden_states",
            "return_dict",
            "logits_to_keep",
            "task_ids",
        ):
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


def score_tokens(
    model,
    batch: dict,
    speed: SpeedConfig,
    want_stats: bool = False,
    want_sq: bool = False,
    attention: str | None = None,
) -> TokenScores:
    """Run `model` on a collate_packed batch -> log-probs of every scored completion token.

    attention: the implementation the batch was laid out for (`fast_attention_for`); None = the model's own.

    chunked_logps: the hidden states of the scored tokens go through ChunkedLMHeadLogps;
    otherwise through the LM head module, (M, V) logits for the scored tokens only. A head dpokit
    cannot apply itself (LoRA on lm_head, logit scaling or softcapping) takes the model's own
    forward and full logits.
    """
    lm = causal_lm(model)
    head = _plain_linear_head(lm)
    dtype = next(lm.parameters()).dtype
    inputs = attention_inputs(lm.config, batch, dtype, attention)
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


def shared_mask(batch: dict) -> torch.Tensor:
    """(M,) True for tokens within the first min(|chosen|, |rejected|) scored tokens of their pair (LD-DPO)."""
    lengths = batch["seq_lengths"]
    chosen_len, rejected_len = lengths.chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2)
    return batch["score_ordinal"] <= shared[batch["score_seq"]]


@torch.no_grad()
def reference_sequence_logps(model, batch: dict, speed: SpeedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs (2B,), LD-DPO shared-prefix sums (2B,)) of one batch, no gradient."""
    n_seq = batch["seq_lengths"].shape[0]
    scores = score_tokens(model, batch, speed)
    seq = batch["score_seq"]
    return per_sequence(scores.logp, seq, n_seq), per_sequence(scores.logp * shared_mask(batch), seq, n_seq)
