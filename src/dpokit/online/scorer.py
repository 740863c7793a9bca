"""What every reward source is: `score(prompts, completions) -> list[float]`, and the errors scorers raise.

Kept apart from scoring.py (rules, reward models, building a scorer from a spec) and judges.py
(LLM judges over HTTP) so that both can use it without importing each other.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from dpokit.online.prompts import Prompt


class ScoringError(RuntimeError):
    """A scorer cannot be built or used; the message says what to fix."""


class JudgeUnreachable(ScoringError):
    """The judge endpoint could not be reached (or kept failing) after every retry."""


@runtime_checkable
class Scorer(Protocol):
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]: ...


def check_lengths(prompts, completions) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
