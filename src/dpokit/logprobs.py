"""Per-token and per-sequence log-probabilities of completion tokens.

Everything downstream (losses, metrics, KL estimates, evaluation) is built on
`token_logps`: the log-probability the model gives each label token, with
positions whose label is IGNORE_INDEX (prompt and padding) set to zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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
def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """Summed log-prob of each completion given its prompt, for evaluation (no gradients).

    prompt_ids, completion_ids: token id lists of equal count. returns (N,) float32 on CPU.
    """
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [p + c for p, c in zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size])]
        plens = [len(p) for p in prompt_ids[start : start + batch_size]]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, pl) in enumerate(zip(seqs, plens)):
            input_ids[i, : len(s)] = torch.tensor(s)
            labels[i, pl : len(s)] = torch.tensor(s[pl:])
            attention[i, : len(s)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        logps, _ = sequence_logps(logits, labels.to(device))
        results.append(logps.float().cpu())
    return torch.cat(results) if results else torch.zeros(0)
