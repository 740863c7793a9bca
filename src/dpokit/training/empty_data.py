"""A run that cannot learn anything: its first optimizer steps train on no completion token, or get no gradient.

A tokenizer that does not match the model (or a chat template that swallows the answers) can leave
every completion empty or masked: the loss is a constant, every gradient exactly 0.0, and the run
would go on for hours changing nothing. The loop stops it after its first FIRST_STEPS steps instead,
with a line naming the tokenizer and what was seen (a DataError: `dpokit train` exits 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from dpokit.data.collate import IGNORE_INDEX

# Three steps: one empty step can be bad luck (a micro-batch of fully truncated completions), and a
# step whose loss is flat by chance still has a nonzero gradient; three in a row with nothing to learn
# from is the data or the tokenizer, and stopping then costs seconds, not the whole run.
FIRST_STEPS = 3


def completion_tokens(batch: dict) -> int:
    """The completion tokens a batch trains on: every collate marks them with labels other than
    IGNORE_INDEX (padded batches; the first position predicts nothing) or lists them in score_pos
    (padding-free rows)."""
    if "score_pos" in batch:
        return int(batch["score_pos"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class EmptyDataGuard:
    """Watches steps 1..FIRST_STEPS of a run (a run resumed past step 1 is not watched: its data trained before)."""

    tokenizer_class: str
    first_steps: int = FIRST_STEPS
    seen: list = field(default_factory=list)  # (completion tokens, grad_norm) of each watched step

    def watching(self, step: int) -> bool:
        return step <= self.first_steps and len(self.seen) == step - 1

    def update(self, step: int, tokens: int, grad_norm: float) -> Optional[str]:
        """Record a watched step; after the last one, the message to stop with when every step was empty, else None."""
        if not self.watching(step):
            return None
        self.seen.append((tokens, grad_norm))
        if step < self.first_steps or not all(t == 0 or g == 0.0 for t, g in self.seen):
            return None
        no_tokens = all(t == 0 for t, _ in self.seen)
        no_gradient = all(g == 0.0 for _, g in self.seen)
        if no_tokens and no_gradient:
            seen = "grad_norm 0.0 and 0 completion tokens"
        elif no_tokens:
            seen = "0 completion tokens"
        elif no_gradient:
            seen = f"grad_norm 0.0 (completion tokens: {', '.join(str(t) for t, _ in self.seen)})"
        else:
            seen = "0 completion tokens or grad_norm 0.0"
        meaning = "the data tokenised to nothing" if no_tokens else "nothing in the data moves the model"
        return (
            f"{self.first_steps} steps with {seen}: {meaning}; check the tokenizer ({self.tokenizer_class}) matches the model "
            "(and that data.max_prompt_length leaves room for the completions)"
        )


def step_completion_tokens(accelerator, batches: list[dict]) -> int:
    """The completion tokens of one optimizer step's batches, summed over every process (a collective: call on all)."""
    local = sum(completion_tokens(batch) for batch in batches)
    if accelerator.num_processes == 1:
        return local
    return int(accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum").item())
