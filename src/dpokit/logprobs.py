"""Per-token and per-sequence log-probabilities of completion tokens.

Everything downstream (losses, metrics, KL estimates, evaluation) is built on
`token_logps`: the log-probability the model gives each label token, with
positions whose label is IGNORE_INDEX (prompt and padding) set to zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.data.batching import to_device
from dpokit.data.collate import IGNORE_INDEX, pad_completions


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits, -1).gather(-1, index[..., None])[..., 0], without the (.., V) log-softmax tensor.

    Computed row by row in float32 so that a bf16 model does not lose precision
    in the log-sum-exp, and peak memory stays at one row's logits.
    """
    out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].float()  # (T, V)
        picked = row.gather(-1, index[i].unsqueeze(-1)).squeeze(-1)
        out[i] = picked - torch.logsumexp(row, dim=-1)
    return out


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted per-token log-probs of the labels.

    logits: (N, T, V) from a causal LM over input_ids (N, T)
    labels: (N, T) = input_ids with IGNORE_INDEX on prompt and padding
    returns (logps, mask), both (N, T-1): logps[i, t] = log p(labels[i, t+1] | ids[i, :t+1]),
    zero where mask is False.
    """
    labels = labels[:, 1:]
    logits = logits[:, :-1]
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    logps = selective_log_softmax(logits, safe_labels)
    return logps * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob per sequence and completion length.

    returns (logps (N,), lengths (N,)); sum over completion tokens, as in the DPO
    paper (Rafailov et al. 2023, Eq. 7 uses log pi(y|x) = sum_t log pi(y_t|x, y_<t)).
    """
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


@torch.no_grad()
def token_entropy_top1(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy of the next-token distribution and whether its argmax is the label, at the completion positions.

    logits (N, T, V), labels (N, T) -> (entropy (K,) float32, top1 (K,) float32 0/1) for the K labelled
    positions, row-major (the order of `token_logps(...)[1]`'s True entries). Row by row and only at
    labelled positions, so at most one row's completion probabilities exist at a time. TRL's
    `entropy` and `mean_token_accuracy`.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    entropy, top1 = [], []
    for i in range(logits.shape[0]):
        row = logits[i, :-1][mask[i]].float()  # (k_i, V)
        e, t = _entropy_top1(row, torch.logsumexp(row, dim=-1), labels[i][mask[i]])
        entropy.append(e)
        top1.append(t)
    empty = logits.new_zeros(0, dtype=torch.float32)
    return (torch.cat(entropy) if entropy else empty), (torch.cat(top1) if top1 else empty)


def _entropy_top1(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy, argmax == target as 0/1) of rows of logits (n, V) with their log-sum-exp (n,)."""
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return entropy, (logits.argmax(-1) == targets).to(logits.dtype)


def token_sq_prob_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p(v)^2 at each shifted position (WPO's normaliser). logits (N, T, V) -> (N, T-1)."""
    out = torch.empty(logits.shape[0], logits.shape[1] - 1, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        out[i] = torch.logsumexp(2 * F.log_softmax(logits[i, :-1].float(), dim=-1), dim=-1)
    return out


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact next-token KL(policy || reference), summed over each sequence's completion positions.

    At every completion position t the two models' full next-token distributions
    are compared: sum_v p(v) (log p(v) - log q(v)). Summed over t this is the KL
    between the two policies along the given completion, in nats per sequence.
    policy_logits, ref_logits: (N, T, V); labels: (N, T). returns (N,).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    for i in range(labels.shape[0]):
        p = F.log_softmax(policy_logits[i, :-1][mask[i]].float(), dim=-1)
        q = F.log_softmax(ref_logits[i, :-1][mask[i]].float(), dim=-1)
        out[i] = (p.exp() * (p - q)).sum()
    return out


@torch.no_grad()
def completion_logps(
    model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int, batch_size: int = 16
) -> torch.Tensor:
    """Summed log-prob of each completion given its prompt, for evaluation (no gradients).

    prompt_ids, completion_ids: token id lists of equal count. returns (N,) float32 on CPU.
    """
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = list(zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]))
        batch = to_device(pad_completions(rows, pad_token_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, _ = sequence_logps(logits, batch["labels"])
        results.append(logps.float().cpu())
    return torch.cat(results) if results else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# Log-probs from hidden states, without a (tokens x vocab) logits tensor
# ---------------------------------------------------------------------------------------------


def auto_chunk_size(vocab_size: int, chunk_size: int = 0) -> int:
    """Tokens per LM-head chunk: `chunk_size` if > 0, else about 4M logits (16 MiB in float32) per chunk."""
    if chunk_size > 0:
        return chunk_size
    return int(max(32, min(4096, (1 << 22) // max(1, vocab_size))))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class ChunkedLMHeadLogps(torch.autograd.Function):
    """log_softmax(hidden @ W^T + b)[target] per token, computed chunk by chunk of tokens.

    Forward keeps only each token's log-prob and log-sum-exp (and, on request, statistics
    without gradient: the vocabulary mean of the logits, the entropy, whether the argmax is the
    target, and log sum_v p(v)^2);
    backward recomputes each chunk's logits and turns them into the gradient in place:
    d logp_t / d logits_t = onehot(target_t) - softmax(logits_t). Peak extra memory is one
    chunk's logits, (chunk, V), instead of (tokens, V) kept for backward.

    hidden (M, H), weight (V, H), bias (V,) or None, targets (M,) -> logp (M,) float32,
    stats (M, 3) or (0, 3): mean logit, entropy, top-1 hit (0/1); log_sum_sq_probs (M,) or (0,).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, want_stats: bool, want_sq: bool):
        dtype = _compute_dtype(hidden, weight)
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # log-softmax always in (at least) float32
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        stats = torch.empty((n if want_stats else 0, 3), dtype=acc, device=hidden.device)
        sq = torch.empty(n if want_sq else 0, dtype=acc, device=hidden.device)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(n, s + chunk_size)
                logits = F.linear(hidden[s:e].to(dtype), w, b).to(acc)  # (c, V)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                lse[s:e] = chunk_lse
                logp[s:e] = logits.gather(-1, targets[s:e, None]).squeeze(-1) - chunk_lse
                if want_stats:
                    stats[s:e, 0] = logits.mean(-1)
                    stats[s:e, 1], stats[s:e, 2] = _entropy_top1(logits, chunk_lse, targets[s:e])
                if want_sq:
                    sq[s:e] = torch.logsumexp(2 * logits, dim=-1) - 2 * chunk_lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.mark_non_differentiable(stats, sq)
        return logp, stats, sq

    @staticmethod
    def backward(ctx, grad_logp, _grad_stats, _grad_sq):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, chunk_size = ctx.dtype, ctx.chunk_size
        need_h, need_w, need_b = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        grad_logp = grad_logp.to(acc)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk_size):
                e = min(hidden.shape[0], s + chunk_size)
                h = hidden[s:e].to(dtype)
                g = grad_logp[s:e]
                logits = F.linear(h, w, b).to(acc)
                d = torch.exp_(logits.sub_(lse[s:e, None])).mul_(-g[:, None])  # -g * softmax
                d.scatter_add_(-1, targets[s:e, None], g[:, None])  # + g * onehot(target)
                if need_h:
                    grad_h[s:e] = (d.to(dtype) @ w).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(d.t(), h.to(acc))
                if need_b:
                    grad_b += d.sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int = 0,
    want_stats: bool = False,
    want_sq: bool = False,
):
    """Per-token log-probs of `targets` under the LM head (weight, bias) applied to `hidden`.

    hidden (M, H) are the final (normed) hidden states of the positions that predict each
    target (M,). Differentiable in hidden, weight and bias (ChunkedLMHeadLogps).
    returns (logp (M,) float32, stats (M, 3) [mean logit, entropy, top-1 hit] or None, log_sum_sq_probs (M,) or None)
    """
    chunk = auto_chunk_size(weight.shape[0], chunk_size)
    logp, stats, sq = ChunkedLMHeadLogps.apply(hidden, weight, bias, targets, chunk, want_stats, want_sq)
    return logp, (stats if want_stats else None), (sq if want_sq else None)


def gathered_token_logps(logits: torch.Tensor, targets: torch.Tensor, want_stats: bool = False, want_sq: bool = False):
    """The same outputs as `chunked_token_logps`, from materialised logits (M, V) (the non-chunked path)."""
    logp = selective_log_softmax(logits[None], targets[None])[0]
    stats = sq = None
    with torch.no_grad():
        if want_stats:
            full = logits.float()
            entropy, top1 = _entropy_top1(full, torch.logsumexp(full, dim=-1), targets)
            stats = torch.stack([full.mean(-1), entropy, top1], dim=-1)
        if want_sq:
            sq = torch.logsumexp(2 * F.log_softmax(logits.float(), dim=-1), dim=-1)
    return logp, stats, sq
