"""Micro-batches for one process out of the global batch order (see BatchStream), and moving them to a device."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch


class BatchStream:
    """Global micro-batches, whatever the number of processes.

    Epoch e visits the examples in the order of a permutation seeded with seed + e; global micro-batch j of
    the epoch is order[j*G : (j+1)*G] with G = batch_size x processes, and process r takes every
    processes-th example of it from offset r. The processes' micro-batches of a step are therefore
    together exactly the micro-batch of one process with batch size G (same losses, same gradient),
    and `position` (global micro-batches consumed) is the whole data position: a resumed run
    recreates the stream at it and feeds the very micro-batches an uninterrupted run would.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1, position: int = 0
    ):
        self.n, self.global_batch, self.seed, self.shuffle, self.rank, self.world = (
            n,
            batch_size * world,
            seed,
            shuffle,
            rank,
            world,
        )
        self.per_epoch = math.ceil(n / self.global_batch)
        self.position = position
        self._order: tuple[int, list[int]] = (-1, [])

    def next(self) -> tuple[list[int], int, list[int]]:
        """(this process's example indices (may be empty), examples in the global micro-batch, the global ones)."""
        epoch, j = divmod(self.position, self.per_epoch)
        if self._order[0] != epoch:
            order = list(range(self.n))
            if self.shuffle:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._order = (epoch, order)
        chunk = self._order[1][j * self.global_batch : (j + 1) * self.global_batch]
        self.position += 1
        return chunk[self.rank :: self.world], len(chunk), chunk


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class MicroBatch(NamedTuple):
    """One process's part of one global micro-batch."""

    batch: dict  # this process's collated examples (a dummy holds one example, trained on with weight 0)
    examples: int  # the global micro-batch's share of the loss denominator (examples, or `weight` summed)
    dummy: bool  # this process has no example of the global micro-batch (the end of an epoch)
    tokens: int  # the global micro-batch's input tokens as `tokens(example)` counts them (0 without it)


def micro_batch(
    examples: list,
    stream: BatchStream,
    collate,
    pad_id: int,
    weight: Optional[Callable] = None,
    tokens: Optional[Callable] = None,
) -> MicroBatch:
    """The next micro-batch of `stream` for this process (see MicroBatch)."""
    local, n_global, chunk = stream.next()
    if weight is not None:  # e.g. SFT: completion tokens, so a step's loss is its token mean
        n_global = sum(weight(examples[i]) for i in chunk)
    n_tokens = sum(tokens(examples[i]) for i in chunk) if tokens is not None else 0
    dummy = not local
    return MicroBatch(
        collate([examples[i] for i in (chunk[:1] if dummy else local)], pad_id), n_global, dummy, n_tokens
    )


def pad_id(model) -> int:
    pad = getattr(getattr(model, "module", model).config, "pad_token_id", None)
    return 0 if pad is None else int(pad)
