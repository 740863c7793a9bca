"""The objectives: one step per kind of data, each a batch -> (loss, metrics) behind one interface (steps/base.py).

train.task=sft                 -> sft.FastSFTStep (sft.SFTStep with speed.packing and speed.chunked_logps off)
loss.type=kto                  -> unpaired.UnpairedStep
a paired loss, any speed.* on  -> paired.FastPairedStep: padding-free rows, shared prompts, chunked LM head,
                                  reference log-probs from the on-disk cache
data.vision                    -> vision.VisionPairedStep: the plain step with pixel values (+ the reference cache)
every speed.* off              -> paired.PairedStep: the plain [chosen; rejected] step with a live reference
"""

from __future__ import annotations

from dpokit.config import Config
from dpokit.losses import is_unpaired
from dpokit.steps.base import Step, StepContext
from dpokit.steps.paired import FastPairedStep, PairedStep
from dpokit.steps.sft import FastSFTStep, SFTStep
from dpokit.steps.token_scores import fast_attention_for
from dpokit.steps.unpaired import UnpairedStep
from dpokit.steps.vision import VisionPairedStep

__all__ = [
    "FastPairedStep",
    "FastSFTStep",
    "PairedStep",
    "SFTStep",
    "Step",
    "StepContext",
    "UnpairedStep",
    "VisionPairedStep",
    "step_for",
]


def step_for(cfg: Config) -> Step:
    """The step this config trains with."""
    speed = cfg.speed
    if cfg.train.task == "sft":
        return FastSFTStep(speed, fast_attention_for(cfg)) if speed.packing or speed.chunked_logps else SFTStep()
    if is_unpaired(cfg.loss):
        return UnpairedStep()
    if cfg.data.vision:  # image rows: the plain step with pixel values (the fast paths do not carry images)
        return VisionPairedStep()
    if (
        speed.any_fast_path
    ):  # padding-free rows, shared prompts, chunked LM head, cached reference (docs/performance.md)
        return FastPairedStep(speed, fast_attention_for(cfg))
    return PairedStep()
