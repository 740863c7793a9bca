"""beta-DPO's adaptive beta, the run's side (loss.beta_schedule=adaptive): M_0 from RunState into each optimizer step and back.

The beta of each micro-batch, its all-reduce and the move of M_0 are the paired step's (steps/beta.py), through
the step's context. Here: before an optimizer step, `for_step` hands its micro-batches M_0 as the last step left
it (RunState.beta_threshold); after the step, `keep` writes the moved M_0 back, so every checkpoint carries it
and a resume continues it.
"""

from __future__ import annotations

from dpokit.losses import LossConfig
from dpokit.steps.beta import MovingThreshold
from dpokit.training.checkpoint import RunState


class AdaptiveBeta:
    """M_0 between RunState and the optimizer steps (`cfg` and `accelerator` are the step's business now, via its ctx)."""

    def __init__(self, cfg: LossConfig, accelerator, state: RunState) -> None:
        self.state = state

    def for_step(self) -> MovingThreshold:
        """This optimizer step's M_0, for its micro-batches' StepContext (ctx.beta)."""
        return MovingThreshold(self.state.beta_threshold)

    def keep(self, threshold: MovingThreshold) -> None:
        """The step's micro-batches moved M_0: into RunState."""
        self.state.beta_threshold = threshold.threshold
