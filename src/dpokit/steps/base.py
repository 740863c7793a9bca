"""The one small interface every objective implements; the training loop calls nothing else.

A `Step` says how its examples are prepared from config.data, batched, counted and scored:

    prepare(cfg, tokenizer)        -> PreparedData (train and eval examples, the data summary)
    collate(examples, pad_id)      -> a batch of tensors
    count(batch)                   -> the batch's share of a step's loss denominator (pairs, examples, tokens)
    weight(example)                -> one example's share of it (count of a batch = sum of its examples' weights)
    tokens(example)                -> input tokens, as TRL's running `num_tokens` counts them
    forward(policy, reference, batch, ctx) -> (LossOutput, {metric: (n,) tensor}), the same for every step
    needs_reference(cfg)           -> whether a reference model (or its cached log-probs) is needed

and, the same for every step (not overridden):

    loss(policy, reference, batch, ctx)     -> (this micro-batch's scaled loss, with gradient; its metrics):
                                               forward, the weight ctx.scale (0 for a dummy), + the SFT rows mixed
                                               into it (ctx.mixed, steps/sft_mix.py)
    evaluate(policy, reference, batch, ctx) -> the metrics of a held-out batch (cached reference log-probs set
                                               aside when the reference runs live, `live_reference`)

`StepContext` is everything a forward needs besides the models and the batch: the config, whether a
reference scores the batch, whether the micro-batch is a dummy, its loss weight, beta-DPO's threshold
(ctx.beta, steps/beta.py), the mixed SFT batches and the accelerator-like handle collectives go through.

Two properties let the setup adapt a step without asking what it is: `plain()` is the step
without the fast paths (for models outside transformers' attention interface), and
`reads_reference_cache` says its batches may carry the reference's cached log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpokit.config import Config
from dpokit.losses import needs_reference

CACHED_REFERENCE_KEYS = ("ref_logps", "ref_shared_logps")  # what ref_cache attaches to a batch


@dataclass(frozen=True)
class StepContext:
    """What one micro-batch's forward needs besides the models and the batch (frozen: a new one per micro-batch)."""

    cfg: Config
    with_reference: bool = True  # a reference scores the batch (a model, or its cached log-probs)
    dummy: bool = False  # a process with no example left: forward and backward at weight 0, every collective joined
    scale: float = 1.0  # the micro-batch's loss weight: 1 / the step's count, times processes and accumulation
    beta: Any = (
        None  # steps.beta.MovingThreshold (loss.beta_schedule=adaptive): the optimizer step's M_0; None: loss.beta
    )
    mixed: Any = None  # steps.sft_mix.MixedBatches: the optimizer step's SFT batches, this micro-batch's at `index`
    index: int = 0  # the micro-batch's position in its optimizer step
    group: Any = (
        None  # accelerator-like (num_processes, reduce, device, gradient_accumulation_steps); None: one process
    )

    @property
    def processes(self) -> int:
        return 1 if self.group is None else self.group.num_processes


def live_reference(reference, ctx: StepContext) -> bool:
    """LoRA training from the reference cache: the reference (adapters off) costs no memory, so evaluation runs it
    live instead of reading the cache, and eval records keep eval_kl/chosen, which a cache cannot give."""
    return ctx.with_reference and reference is None and ctx.cfg.lora.enabled


def without_cached_reference(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in CACHED_REFERENCE_KEYS}


class Step:
    name = "dpo"  # the progress bar's label
    reads_reference_cache = False  # batches may carry cached reference log-probs (ref_cache), no reference model then

    def prepare(self, cfg: Config, tokenizer):
        raise NotImplementedError

    def collate(self, examples: list, pad_token_id: int) -> dict:
        raise NotImplementedError

    def count(self, batch: dict) -> int:
        raise NotImplementedError

    def weight(self, example) -> float:
        return 1  # a step's loss is the mean over its examples

    def tokens(self, example) -> int:
        raise NotImplementedError

    def forward(self, policy, reference, batch: dict, ctx: StepContext) -> tuple:
        raise NotImplementedError

    def loss(self, policy, reference, batch: dict, ctx: StepContext) -> tuple:
        """(the micro-batch's loss: its per-example loss sum at ctx.scale, 0 for a dummy, + the mixed SFT term; metrics)."""
        out, metrics = self.forward(policy, reference, batch, ctx)
        loss = out.losses.sum() * (0.0 if ctx.dummy else ctx.scale)
        if ctx.mixed is not None:  # SFT rows mixed into the pairs (data.sft_mix_path)
            mixed_loss, nll = ctx.mixed.loss(policy, ctx)
            loss = loss + mixed_loss
            metrics = {**metrics, "sft_mix/nll": nll}
        return loss, metrics

    def evaluate(self, policy, reference, batch: dict, ctx: StepContext) -> dict:
        """The metrics of one held-out batch (no gradient is asked for; the caller turns it off)."""
        if live_reference(reference, ctx):
            batch = without_cached_reference(batch)
        return self.forward(policy, reference, batch, ctx)[1]

    def needs_reference(self, cfg: Config) -> bool:
        return needs_reference(cfg.loss)  # reference-free losses build and run no reference

    @property
    def is_fast(self) -> bool:
        return self.plain() is not self

    def plain(self) -> "Step":
        """This step without the fast paths (padding-free rows, chunked LM head); itself when it has none."""
        return self
