"""Tokenised pairs -> one padded batch, ordered [chosen; rejected].

Chosen and rejected sequences go through the model in one forward pass (the
paper's `concatenated_inputs`): rows 0..B-1 are prompt + chosen, rows B..2B-1
are prompt + rejected, right-padded to the longest row. Labels repeat the
completion tokens and hold IGNORE_INDEX on the prompt and the padding, so only
completion tokens reach the loss.
"""

from __future__ import annotations

import torch

from dpokit.data.tokenization import TokenizedPair

IGNORE_INDEX = -100  # the label of positions with no loss (prompt, padding): PyTorch's cross-entropy default


def pad_completions(
    rows: list[tuple[list[int], list[int]]], pad_token_id: int, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) rows -> right-padded (N, T) long tensors, keys prefixed with `prefix`.

    input_ids: prompt + completion, then pad_token_id; attention_mask: 1 on those tokens; labels:
    the completion tokens only, IGNORE_INDEX on the prompt and the padding. Every batch (paired,
    KTO, SFT) is padded here.
    """
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        labels[i, n_prompt:n] = torch.tensor(completion, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": attention_mask, f"{prefix}labels": labels}


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """returns input_ids, attention_mask, labels: (2B, T) long tensors."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return pad_completions(rows, pad_token_id)


def attach_cached_reference(batch: dict, pairs) -> dict:
    """Cached reference log-probs (ref_cache sets each pair's `reference`) ride along with the batch as
    ref_logps and ref_shared_logps, (2B,) in [chosen; rejected] order; untouched when any pair lacks them."""
    refs = [getattr(p, "reference", None) for p in pairs]
    if refs and all(r is not None for r in refs):
        ref = torch.tensor(refs, dtype=torch.float32)  # (B, 4): chosen, rejected, chosen_shared, rejected_shared
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        batch["ref_shared_logps"] = torch.cat([ref[:, 2], ref[:, 3]])
    return batch
