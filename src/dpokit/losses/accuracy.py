"""Preference accuracy, one definition for training's `rewards/accuracies` and `dpokit eval`'s `preference_accuracy`.

A pair is counted as correct when the chosen side's implicit reward is strictly higher than the rejected side's;
a tie counts as not chosen (0), as TRL's rewards/accuracies does. So a policy equal to its reference, which ties
on every pair, scores 0, not the 0.5 of a coin flip: "chosen ranked first", not "chosen not ranked second".
"""

from __future__ import annotations

import torch


def preference_correct(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1.0 per pair whose chosen reward is strictly above its rejected reward, else 0.0 (a tie is 0): (B,), (B,) -> (B,).

    Any monotone reward works (beta * log pi/ref, or log pi/ref alone: beta > 0 does not change the order).
    """
    return (chosen > rejected).float()
