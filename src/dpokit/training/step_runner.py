"""Running the step over micro-batches: one optimizer step's gradients, and the metrics of the held-out examples."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate.utils import DistributedType

from dpokit.data.batching import BatchStream, micro_batch, pad_id, to_device
from dpokit.steps import Step
from dpokit.steps.base import StepContext
from dpokit.training.metrics import MetricSums
from dpokit.training.throughput import Throughput


@dataclass(frozen=True)
class StepJob:
    """What one optimizer step's micro-batches run with: the models, the step, its context, the throughput counter.

    ctx: the config, with_reference, the accelerator (ctx.group), the step's beta-DPO threshold (ctx.beta) and
    mixed SFT batches (ctx.mixed); each micro-batch gets it with its own position, dummy flag and loss weight.
    """

    policy: Any
    reference: Any  # None: reference-free, or reference log-probs from the cache (LoRA: the adapters off)
    objective: Step
    ctx: StepContext
    throughput: Optional[Throughput] = None  # training/throughput.py: tokens, positions and FLOPs of the micro-batches

    @property
    def accelerator(self):
        return self.ctx.group


def accumulate_gradients(
    job: StepJob,
    micro_batches: list[dict],
    sums: MetricSums,
    examples_in_step: Optional[int] = None,
    dummies: Optional[list[bool]] = None,
) -> None:
    """Backward over one optimizer step's micro-batches; per-example metrics are added to `sums`.

    The loss of each micro-batch is its per-example loss sum divided by the examples in the
    whole step, so the accumulated gradient is that of the mean over the step's examples:
    batch 8 x accumulation 1 and batch 4 x accumulation 2 give the same gradient.
    `examples_in_step` counts them over all processes (default: this one's); as DDP/FSDP average
    the gradients of the processes, each one's loss is scaled by the number of processes.
    A dummy micro-batch (a process with no example left at the end of an epoch) runs forward and
    backward with weight 0, so every process takes part in every collective, and adds no metric.
    What a micro-batch's loss holds besides its examples' (beta-DPO's beta, the mixed SFT rows) is the step's
    business (`Step.loss`), through job.ctx.
    """
    objective, accelerator = job.objective, job.accelerator
    dummies = dummies or [False] * len(micro_batches)
    if examples_in_step is None:
        scale = 1.0 / sum(objective.count(b) for b, dummy in zip(micro_batches, dummies) if not dummy)
    else:
        scale = accelerator.num_processes / examples_in_step
    scale *= accelerator.gradient_accumulation_steps  # undo Accelerate's (and DeepSpeed's) own division by it
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if job.throughput is not None:
        job.throughput.add_step(micro_batches, dummies, job.ctx.with_reference, job.ctx.mixed)
    for i, (batch, dummy) in enumerate(zip(micro_batches, dummies)):
        batch = to_device(batch, accelerator.device)
        last = i == len(micro_batches) - 1
        if deepspeed:  # the engine reduces, clips and steps inside backward, at the step's last micro-batch
            accelerator.sync_gradients = last
        # Gradients are all-reduced across processes only on the last micro-batch of the step.
        sync = contextlib.nullcontext() if last or deepspeed else accelerator.no_sync(job.policy)
        ctx = dataclasses.replace(job.ctx, dummy=dummy, scale=scale, index=i)
        with sync:
            with accelerator.autocast():
                loss, metrics = objective.loss(job.policy, job.reference, batch, ctx)
            accelerator.backward(loss)
        for name, values in metrics.items():
            sums.add(name, values[:0] if dummy else values)  # a dummy registers the names, with no values


@torch.no_grad()
def evaluate(job: StepJob, pairs) -> dict:
    """Metrics over every held-out example, each process scoring its slice of each global batch (job.ctx: no beta, no mix)."""
    policy, accelerator, cfg = job.policy, job.accelerator, job.ctx.cfg
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    stream = BatchStream(
        len(pairs), batch_size, 0, shuffle=False, rank=accelerator.process_index, world=accelerator.num_processes
    )
    for _ in range(stream.per_epoch):
        micro = micro_batch(pairs, stream, job.objective.collate, pad_id(policy))
        with accelerator.autocast():
            metrics = job.objective.evaluate(policy, job.reference, to_device(micro.batch, accelerator.device), job.ctx)
        for name, values in metrics.items():
            sums.add(name, values[:0] if micro.dummy else values)
    policy.train(was_training)
    return {f"eval_{k}": v for k, v in sums.reduce(accelerator).items()}


def agree(accelerator, *flags: bool) -> list[bool]:
    """The same decision on every process: a flag holds if it holds on any process."""
    if accelerator.num_processes == 1:
        return list(flags)
    packed = accelerator.reduce(torch.tensor([float(f) for f in flags], device=accelerator.device), reduction="sum")
    return [bool(v > 0) for v in packed.tolist()]


def keep_step(window: MetricSums, step_sums: MetricSums, keep: bool) -> None:
    """Add one optimizer step's metric sums to the logging window; a skipped step (keep=False) adds nothing."""
    # A skipped step still registers its metric names (every process must reduce the same ones).
    for name in step_sums.sums:
        window.sums[name] = window.sums.get(name, 0.0) + (step_sums.sums[name] if keep else 0.0)
        window.counts[name] = window.counts.get(name, 0.0) + (step_sums.counts[name] if keep else 0.0)
