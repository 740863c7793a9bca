"""Tokenised pairs -> padding-free rows: packed sequences and prompt-shared pairs.

The plain batch (collate.py) is 2B rows [chosen; rejected], each prompt + completion,
right-padded to the longest row. Two layouts remove most of that work:

  prefix sharing  one *unit* per pair: [prompt, chosen, rejected] in one row. Position ids
                  of the rejected tokens continue from the prompt end (as if the chosen
                  tokens were not there); rejected tokens attend to the prompt and to
                  themselves, never to the chosen tokens. The prompt is computed once
                  for both completions (Wang & Hegde 2024, arXiv 2410.20305).
  packing         several units per row, first-fit decreasing into rows of
                  `pack_length` tokens (at least the longest unit, so no unit is split);
                  position ids restart at every unit and attention never crosses units.

Without prefix sharing a pair is two units, prompt + chosen and prompt + rejected, so
the same code also produces the plain layout (packing off: one unit per row).

What the model needs to attend correctly travels with the batch as small integer tensors
(`units`, `segment_ids`, `branch`); `dpokit.packed_attention` turns them into segment-wise
SDPA calls, a block-diagonal 4D mask, a FlexAttention BlockMask, or flash-attention varlen
positions. What the loss needs is a list of *scored tokens*: for every completion token,
the flat position (row * L + column) of the hidden state that predicts it, the token id,
the sequence it belongs to (0..B-1 chosen, B..2B-1 rejected, as in collate.py) and its
1-based index within that completion.

Exactly the tokens the plain batch scores are scored here: labels are shifted, so a
completion token is scored only when something precedes it (an empty prompt leaves the
first completion token unscored, as in collate_pairs).
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

import torch

from dpokit.data.tokenization import TokenizedPair

PROMPT, FIRST, SECOND = 0, 1, 2  # `branch` values: shared prompt (or a whole plain sequence), chosen, rejected
PAD_SEGMENT = -1


@dataclass(frozen=True)
class Layout:
    """How pairs are laid out in rows. packing=False, prefix_sharing=False is the plain padded batch."""

    packing: bool = True
    prefix_sharing: bool = True
    pack_length: int = 0  # tokens per packed row; 0 = the longest unit of the micro-batch (rows never grow past it)
    single_row: bool = False  # everything in one row (flash-attention varlen wants batch size 1)


def pair_hash(pair: TokenizedPair) -> int:
    """A stable 63-bit hash of a pair's token ids (prompt, chosen, rejected): the example id's checksum."""
    h = hashlib.blake2b(digest_size=8)
    for part in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        h.update(len(part).to_bytes(4, "little"))
        h.update(array("q", part).tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _units(pairs: list[TokenizedPair], prefix_sharing: bool) -> list[tuple]:
    """(tokens, prompt_len, first_len, second_len, first_seq, second_seq); second_len 0 = one plain sequence."""
    n = len(pairs)
    if prefix_sharing:
        return [
            (
                p.prompt_ids + p.chosen_ids + p.rejected_ids,
                len(p.prompt_ids),
                len(p.chosen_ids),
                len(p.rejected_ids),
                i,
                n + i,
            )
            for i, p in enumerate(pairs)
        ]
    chosen = [
        (p.prompt_ids + p.chosen_ids, len(p.prompt_ids), len(p.chosen_ids), 0, i, -1) for i, p in enumerate(pairs)
    ]
    rejected = [
        (p.prompt_ids + p.rejected_ids, len(p.prompt_ids), len(p.rejected_ids), 0, n + i, -1)
        for i, p in enumerate(pairs)
    ]
    return chosen + rejected


def _assign_rows(lengths: list[int], layout: Layout) -> tuple[list[list[int]], int]:
    """Unit indices per row, and the row width. First-fit decreasing when packing."""
    if layout.single_row:
        return [list(range(len(lengths)))], sum(lengths)
    if not layout.packing:
        return [[i] for i in range(len(lengths))], max(lengths)
    capacity = max(max(lengths), layout.pack_length)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    width = max(capacity - free for free in room)
    return rows, width


def collate_packed(pairs: list[TokenizedPair], pad_token_id: int, layout: Layout = Layout()) -> dict[str, torch.Tensor]:
    """B pairs -> one padding-free batch.

    returns
      input_ids, position_ids, segment_ids, branch: (R, L); segment_ids is the unit index, -1 on padding;
        branch is 0 on a prompt (or a whole plain sequence), 1 on a shared unit's chosen, 2 on its rejected tokens
      units: (U, 5) [row, start, prompt_len, first_len, second_len] (second_len 0: a plain sequence)
      score_pos, score_target, score_seq, score_ordinal: (M,) one entry per scored completion token
      score_order: (M,) the permutation that puts those entries in (sequence, token) order
      seq_lengths: (2B,) scored tokens per sequence, [chosen; rejected]
      pair_hash: (B,) `pair_hash` of each pair (the reference cache checks it)
    """
    batch = _pack(_units(pairs, layout.prefix_sharing), 2 * len(pairs), pad_token_id, layout)
    batch["pair_hash"] = torch.tensor([pair_hash(p) for p in pairs], dtype=torch.long)
    return batch


def collate_packed_sequences(
    sequences: list[tuple[list[int], list[int]]], pad_token_id: int, layout: Layout = Layout()
) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) sequences -> collate_packed's padding-free batch, one plain unit per sequence.

    Sequence i is `score_seq` i; its completion tokens are scored (SFT); `seq_lengths` is (N,).
    """
    units = [
        (prompt + completion, len(prompt), len(completion), 0, i, -1)
        for i, (prompt, completion) in enumerate(sequences)
    ]
    return _pack(units, len(sequences), pad_token_id, layout)


def _pack(units: list[tuple], n_seq: int, pad_token_id: int, layout: Layout) -> dict[str, torch.Tensor]:
    """Units (see `_units`) into rows: the tensors collate_packed documents, but pair_hash."""
    rows, width = _assign_rows([len(u[0]) for u in units], layout)
    shape = (len(rows), width)
    batch = {
        "input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "segment_ids": torch.full(shape, PAD_SEGMENT, dtype=torch.long),
        "branch": torch.zeros(shape, dtype=torch.int8),
    }
    unit_table = []
    scored = _ScoredTokens(n_seq, width)
    for r, members in enumerate(rows):
        cursor = 0
        for u in members:
            unit_table.append(_place_unit(batch, units[u], u, r, cursor))
            scored.add_unit(units[u], r, cursor)
            cursor += len(units[u][0])
        if cursor < width:  # padding: its own run of positions, so varlen kernels see it as one more sequence
            batch["position_ids"][r, cursor:] = torch.arange(width - cursor)
    batch["units"] = torch.tensor(unit_table, dtype=torch.long).reshape(-1, 5)
    return {**batch, **scored.tensors()}


def _place_unit(batch: dict[str, torch.Tensor], unit: tuple, index: int, row: int, start: int) -> tuple[int, ...]:
    """Write unit `index` into `row` from column `start` (tokens, segment, positions, branches); its `units` entry."""
    tokens, p, a, b, _, _ = unit
    s, n = start, len(tokens)
    batch["input_ids"][row, s : s + n] = torch.tensor(tokens, dtype=torch.long)
    batch["segment_ids"][row, s : s + n] = index
    batch["position_ids"][row, s : s + p + a] = torch.arange(p + a)
    if b != 0:  # a shared unit: the rejected tokens' positions continue from the prompt end
        batch["branch"][row, s + p : s + p + a] = FIRST
        batch["branch"][row, s + p + a : s + n] = SECOND
        batch["position_ids"][row, s + p + a : s + n] = torch.arange(p, p + b)
    return row, s, p, a, b


class _ScoredTokens:
    """The scored completion tokens of a batch (collate_packed's score_* and seq_lengths), unit by unit."""

    def __init__(self, n_seq: int, width: int) -> None:
        self.width = width
        self.positions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.seqs: list[torch.Tensor] = []
        self.ordinals: list[torch.Tensor] = []
        self.seq_lengths = [0] * n_seq

    def add_unit(self, unit: tuple, row: int, start: int) -> None:
        """Score a unit placed at `start` of `row`: each completion token is predicted by the position before it."""
        tokens, p, a, b, first_seq, second_seq = unit
        s, n = start, len(tokens)
        first = tokens[p : p + a]
        # completion token k is predicted by position s + p + k - 1; after an empty prompt the first has no predictor
        skip = 1 if p == 0 else 0
        self._add(first_seq, row, range(s + p - 1 + skip, s + p + a - 1), first[skip:])
        if b == 0:
            return
        second = tokens[p + a :]
        # the rejected's first token is predicted by the prompt's last token, the rest by the rejected's own
        if p > 0:
            self._add(second_seq, row, range(s + p - 1, s + p), second[:1])
        self._add(second_seq, row, range(s + p + a, s + n - 1), second[1:], offset=1 if p > 0 else 0)

    def _add(self, seq: int, row: int, predictors: range, targets: list[int], offset: int = 0) -> None:
        # offset: tokens of this completion already scored (1-based ordinals continue from there)
        n = len(targets)
        if n == 0:
            return
        self.positions.append(torch.tensor(predictors, dtype=torch.long) + row * self.width)
        self.targets.append(torch.tensor(targets, dtype=torch.long))
        self.seqs.append(torch.full((n,), seq, dtype=torch.long))
        self.ordinals.append(torch.arange(offset + 1, offset + n + 1, dtype=torch.long))
        self.seq_lengths[seq] += n

    def tensors(self) -> dict[str, torch.Tensor]:
        empty = torch.zeros(0, dtype=torch.long)
        seq = torch.cat(self.seqs) if self.seqs else empty
        ordinal = torch.cat(self.ordinals) if self.ordinals else empty
        # rows hold units in packing order; this permutation puts the scored tokens in (sequence, token) order,
        # the order of the plain padded batch, for the per-token metrics
        order = torch.argsort(seq * (int(ordinal.max()) + 1 if ordinal.numel() else 1) + ordinal)
        return {
            "score_pos": torch.cat(self.positions) if self.positions else empty,
            "score_target": torch.cat(self.targets) if self.targets else empty,
            "score_seq": seq,
            "score_ordinal": ordinal,
            "score_order": order,
            "seq_lengths": torch.tensor(self.seq_lengths, dtype=torch.long),
        }


def count_pairs(batch: dict) -> int:
    """Pairs in a batch from collate_packed or collate_pairs (the paired step's `count`)."""
    if "seq_lengths" in batch:
        return batch["seq_lengths"].shape[0] // 2
    return batch["input_ids"].shape[0] // 2
