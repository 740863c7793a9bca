"""SFT mixing: a separate SFT dataset's completion NLL added to the preference loss (data.sft_mix_path).

The usual guard against forgetting in DPO is to keep training on a little SFT data (5-10% of
the examples) alongside the pairs. Each micro-batch of pairs gets `data.sft_mix_batch_size`
SFT examples, and the optimizer step minimises

    loss = mean over the step's pairs of the preference loss
           + loss.sft_mix_weight * (sum of the mixed completion NLLs / completion tokens mixed into the step)

The second term is a token mean over every mixed example of the optimizer step (all micro-batches
and processes), as `dpokit sft` computes it, so gradient accumulation and the number of processes do
not change it. It is not RPO's NLL on the chosen answers (loss.type=[sigmoid, sft]): the mixed
rows are other text, e.g. the SFT data the reference was trained on.

The mixed examples are drawn by a BatchStream at position (step - 1) x train.grad_accum, so
a resumed run draws exactly what an uninterrupted one would, with no state to save.
Metric: sft_mix/nll, the mean NLL per mixed completion token (the term before its weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpokit.config import Config
from dpokit.data.batching import BatchStream, to_device
from dpokit.data.sft import prepare_sft_file
from dpokit.steps.base import StepContext
from dpokit.steps.sft import collate_sft, example_tokens, forward_sft

MIX_SEED_OFFSET = 7919  # the mixed rows are shuffled independently of the pairs' order


def mix_batch_size(cfg: Config) -> int:
    """data.sft_mix_batch_size, or ceil(train.batch_size / 10) when 0: about 10% as many SFT examples as pairs."""
    return cfg.data.sft_mix_batch_size or max(1, math.ceil(cfg.train.batch_size / 10))


@dataclass
class MixedBatches:
    """One optimizer step's SFT batches (one per micro-batch of pairs) and the scale of their NLL sums."""

    batches: list[dict]
    dummies: list[bool]  # a process left without an example scores one with weight 0, so it joins every collective
    scale: float  # loss.sft_mix_weight / completion tokens mixed into the whole step (all processes)

    def loss(self, policy, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(micro-batch ctx.index's term of the step's loss, with gradient; its per-token NLL values for sft_mix/nll).

        As the pairs' ctx.scale, the term undoes the processes' and Accelerate's averaging of the gradients.
        """
        dummy, group = self.dummies[ctx.index], ctx.group
        nll_sum, nll = SFTMix.loss(policy, to_device(self.batches[ctx.index], group.device), ctx.cfg)
        scale = self.scale * group.num_processes * group.gradient_accumulation_steps
        return nll_sum * (0.0 if dummy else scale), nll[:0] if dummy else nll


class SFTMix:
    """The SFT examples mixed into every optimizer step; `draw` gives a step's batches, `loss` one batch's term."""

    def __init__(self, examples: list, cfg: Config, rank: int = 0, world: int = 1) -> None:
        self.examples, self.weight = examples, cfg.loss.sft_mix_weight
        self.batch_size, self.grad_accum = mix_batch_size(cfg), cfg.train.grad_accum
        self.seed, self.rank, self.world = cfg.train.seed + MIX_SEED_OFFSET, rank, world

    @classmethod
    def from_config(
        cls, cfg: Config, tokenizer, rank: int = 0, world: int = 1, examples: list | None = None
    ) -> "SFTMix | None":
        """None when data.sft_mix_path is unset. examples: the file's, already prepared (training.setup.training_data
        reports their skips); else it is prepared here."""
        if not cfg.data.sft_mix_path:
            return None
        if examples is None:
            examples, _ = prepare_sft_file(cfg.data.sft_mix_path, "data.sft_mix_path", cfg, tokenizer)
        return cls(examples, cfg, rank, world)

    def draw(self, step: int, pad_token_id: int) -> MixedBatches:
        """The SFT batches of optimizer step `step` (1-based) for this process."""
        stream = BatchStream(
            len(self.examples),
            self.batch_size,
            self.seed,
            rank=self.rank,
            world=self.world,
            position=(step - 1) * self.grad_accum,
        )
        batches, dummies, tokens = [], [], 0
        for _ in range(self.grad_accum):
            local, _, chunk = stream.next()
            batches.append(collate_sft([self.examples[i] for i in (local or chunk[:1])], pad_token_id))
            dummies.append(not local)
            tokens += sum(
                example_tokens(self.examples[i]) for i in chunk
            )  # the global micro-batch: every process agrees
        return MixedBatches(batches, dummies, self.weight / max(tokens, 1))

    @staticmethod
    def loss(policy, batch: dict, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed completion NLL of the batch, with gradient; per-token NLL values for sft_mix/nll)."""
        out, metrics = forward_sft(
            policy, None, batch, cfg, False, router_aux=False
        )  # the pairs' batch carries aux_loss
        return out.losses.sum(), metrics["loss"]
