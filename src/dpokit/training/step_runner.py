"""Running the step over micro-batches: one optimizer step's gradients, and the metrics of the held-out examples."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from accelerate.utils import DistributedType

from dpokit.config import Config
from dpokit.data.batching import BatchStream, micro_batch, pad_id, to_device
from dpokit.steps import PairedStep, Step
from dpokit.steps.sft_mix import MixedBatches, SFTMix
from dpokit.training.metrics import MetricSums
from dpokit.training.throughput import Throughput


def accumulate_gradients(policy, reference, micro_batches: list[dict], cfg: Config, accelerator, with_reference: bool, sums: MetricSums,
                         objective: Step = PairedStep(), examples_in_step: Optional[int] = None, dummies: Optional[list[bool]] = None,
                         beta=None, mixed: Optional[MixedBatches] = None, throughput: Optional[Throughput] = None) -> None:
    """Backward over one optimizer step's micro-batches; per-example metrics are added to `sums`.

    The loss of each micro-batch is its per-example loss sum divided by the examples in the
    whole step, so the accumulated gradient is that of the mean over the step's examples:
    batch 8 x accumulation 1 and batch 4 x accumulation 2 give the same gradient.
    `examples_in_step` counts them over all processes (default: this one's); as DDP/FSDP average
    the gradients of the processes, each one's loss is scaled by the number of processes.
    A dummy micro-batch (a process with no example left at the end of an epoch) runs forward and
    backward with weight 0, so every process takes part in every collective, and adds no metric.
    `beta` (training/adaptive_beta.AdaptiveBeta, loss.beta_schedule=adaptive) gives each micro-batch its beta.
    `mixed` (steps/sft_mix.py): one SFT batch per micro-batch, whose NLL sum joins that micro-batch's loss
    at `mixed.scale` (the step's token mean, times loss.sft_mix_weight) before the one backward.
    `throughput` (training/throughput.py) counts the tokens, positions and model FLOPs of the micro-batches.
    """
    dummies = dummies or [False] * len(micro_batches)
    if examples_in_step is None:
        scale = 1.0 / sum(objective.count(b) for b, dummy in zip(micro_batches, dummies) if not dummy)
    else:
        scale = accelerator.num_processes / examples_in_step
    scale *= accelerator.gradient_accumulation_steps  # undo Accelerate's (and DeepSpeed's) own division by it
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if throughput is not None:
        throughput.add_step(micro_batches, dummies, with_reference, mixed)
    for i, (batch, dummy) in enumerate(zip(micro_batches, dummies)):
        batch = to_device(batch, accelerator.device)
        last = i == len(micro_batches) - 1
        if deepspeed:  # the engine reduces, clips and steps inside backward, at the step's last micro-batch
            accelerator.sync_gradients = last
        # Gradients are all-reduced across processes only on the last micro-batch of the step.
        sync = contextlib.nullcontext() if last or deepspeed else accelerator.no_sync(policy)
        with sync:
            with accelerator.autocast():
                extra = {} if beta is None else {"beta_for": beta.for_micro_batch(dummy)}
                out, metrics = objective.forward(policy, reference, batch, cfg, with_reference, **extra)
                loss = out.losses.sum() * (0.0 if dummy else scale)
                if mixed is not None:  # as the pairs' scale: undo the processes' and Accelerate's averaging
                    mix_dummy = mixed.dummies[i]
                    nll_sum, nll = SFTMix.loss(policy, to_device(mixed.batches[i], accelerator.device), cfg)
                    mix_scale = mixed.scale * accelerator.num_processes * accelerator.gradient_accumulation_steps
                    loss = loss + nll_sum * (0.0 if mix_dummy else mix_scale)
                    metrics = {**metrics, "sft_mix/nll": nll[:0] if mix_dummy else nll}
            accelerator.backward(loss)
        for name, values in metrics.items():
            sums.add(name, values[:0] if dummy else values)  # a dummy registers the names, with no values


@torch.no_grad()
def evaluate(policy, reference, pairs, cfg: Config, accelerator, with_reference: bool, objective: Step = PairedStep()) -> dict:
    """Metrics over every held-out example, each process scoring its slice of each global batch."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    stream = BatchStream(len(pairs), batch_size, 0, shuffle=False, rank=accelerator.process_index, world=accelerator.num_processes)
    # LoRA training from the reference cache: the reference (adapters off) costs no memory, so evaluation runs it
    # live instead of reading the cache, and eval records keep eval_kl/chosen, which a cache cannot give.
    live_reference = with_reference and reference is None and cfg.lora.enabled
    for _ in range(stream.per_epoch):
        micro = micro_batch(pairs, stream, objective.collate, pad_id(policy))
        batch = micro.batch
        if live_reference:
            batch = {k: v for k, v in batch.items() if k not in ("ref_logps", "ref_shared_logps")}
        with accelerator.autocast():
            _, metrics = objective.forward(policy, reference, to_device(batch, accelerator.device), cfg, with_reference)
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
