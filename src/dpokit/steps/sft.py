"""Supervised fine-tuning as a Step: completion-only NLL, the prompt masked out.

`dpokit sft CONFIG` (or `train.task: sft`) runs the ordinary training loop with this step,
so SFT shares the config, data loading (data/sft.py), run directory, metrics log, evaluation
and saving of `dpokit train`.

Loss: the mean token NLL over the completion tokens of the optimizer step,

    loss = sum_i sum_{t in completion_i} -log pi(y_t | x, y_<t)  /  sum_i |completion_i|

`forward` returns each example's *summed* NLL, and `count` (a batch) and `weight` (an example) give
completion tokens, so the trainer's division of the step's loss sum by its count is that token mean
exactly, whatever the batch size, gradient accumulation and number of processes (TRL averages per
micro-batch instead).

Metrics (averaged over the logging window, like every dpokit metric):
    loss                  mean NLL per completion token (the quantity minimised)
    mean_token_accuracy   share of completion tokens that are the model's argmax prediction
    num_tokens            running total of the input tokens (prompt + completion) trained on, as TRL's
"""

from __future__ import annotations

import torch

from dpokit.config import Config, SpeedConfig
from dpokit.data.collate import IGNORE_INDEX, pad_completions
from dpokit.data.packing import collate_packed_sequences
from dpokit.data.sft import prepare_sft
from dpokit.data.unpaired import TokenizedCompletion
from dpokit.logprobs import token_logps
from dpokit.losses import LossOutput
from dpokit.steps.base import Step, StepContext
from dpokit.steps.router_aux import add_router_aux, packed_token_weights, recording, router_for
from dpokit.steps.token_scores import fast_attention_for, layout_for, per_sequence, score_tokens


def collate_sft(examples: list[TokenizedCompletion], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels: (B, T), right-padded; labels hold only the completion tokens."""
    return pad_completions([(e.prompt_ids, e.completion_ids) for e in examples], pad_token_id)


def count_tokens(batch: dict) -> int:
    """Completion (trained) tokens in the batch (collate_sft's or a packed one): the loss is a mean over these."""
    if "score_pos" in batch:
        return int(batch["score_pos"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def make_sft_collate(speed, attn_implementation=None):
    """(examples, pad_token_id) -> a padding-free batch (data/packing.py) for forward_sft_fast."""
    layout = layout_for(speed, attn_implementation)

    def collate(examples: list[TokenizedCompletion], pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate_packed_sequences([(e.prompt_ids, e.completion_ids) for e in examples], pad_token_id, layout)

    return collate


def example_tokens(example: TokenizedCompletion) -> int:
    """Completion tokens of one example that get a loss (`count_tokens` of a batch is their sum).

    A token is predicted from the ones before it, so with an empty prompt the first completion
    token has no loss.
    """
    return len(example.completion_ids) - (0 if example.prompt_ids else 1)


def forward_sft(policy, reference, batch: dict, cfg: Config, with_reference: bool, router_aux: bool = True) -> tuple:
    """-> (LossOutput with each example's summed completion NLL, metrics: name -> tensor of values).

    `reference` and `with_reference` are ignored: SFT has no reference model. router_aux: an MoE policy's
    load-balancing loss joins each example's loss (steps/router_aux.py); False for SFT rows mixed into DPO, and
    no cfg (training/retention.py measures the NLL alone) has none either.
    """
    labels = batch["labels"]
    router = router_for(policy, cfg.loss) if router_aux and cfg is not None else None  # None for a dense model
    with recording(policy, router) as router_logits:
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    tok_logps, mask = token_logps(logits, labels)  # (B, T-1), zero off the completion
    nll = -tok_logps
    out = LossOutput(nll.sum(-1), torch.zeros(0), torch.zeros(0))
    with torch.no_grad():
        correct = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask
        metrics = {
            "loss": nll.detach()[mask],  # one value per completion token: the window average is the token mean
            "mean_token_accuracy": correct[mask].float(),
        }
    add_router_aux(router, router_logits, batch["attention_mask"], out, metrics, shares=mask.sum(-1))  # per token
    return out, metrics


def forward_sft_fast(policy, reference, batch: dict, cfg: Config, with_reference: bool) -> tuple:
    """forward_sft on a make_sft_collate batch: padding-free rows, the LM head on completion tokens only, by chunks
    with `speed.chunked_logps` (preference_step.score_tokens). Same losses, metrics and gradients (tests/test_sft.py)."""
    router = router_for(policy, cfg.loss)  # None for a dense model
    with recording(policy, router) as router_logits:
        scores = score_tokens(policy, batch, cfg.speed, want_stats=True, attention=fast_attention_for(cfg))
    nll = -scores.logp
    out = LossOutput(
        per_sequence(nll, batch["score_seq"], batch["seq_lengths"].shape[0]), torch.zeros(0), torch.zeros(0)
    )
    order = batch["score_order"]  # forward_sft's (example, token) order
    metrics = {"loss": nll.detach()[order], "mean_token_accuracy": scores.stats[order, 2]}
    add_router_aux(router, router_logits, packed_token_weights(batch), out, metrics, shares=batch["seq_lengths"])
    return out, metrics


def input_tokens(example: TokenizedCompletion) -> int:
    """Prompt + completion tokens: what TRL's running `num_tokens` counts for SFT."""
    return len(example.prompt_ids) + len(example.completion_ids)


class SFTStep(Step):
    """A step's loss is divided by its completion tokens (over all micro-batches and processes), not its examples."""

    name = "sft"

    def prepare(self, cfg: Config, tokenizer):
        return prepare_sft(cfg, tokenizer)

    def collate(self, examples: list[TokenizedCompletion], pad_token_id: int) -> dict:
        return collate_sft(examples, pad_token_id)

    def count(self, batch: dict) -> int:
        return count_tokens(batch)

    def weight(self, example: TokenizedCompletion) -> int:
        return example_tokens(example)

    def tokens(self, example: TokenizedCompletion) -> int:
        return input_tokens(example)

    def forward(self, policy, reference, batch: dict, ctx: StepContext) -> tuple:
        return forward_sft(policy, reference, batch, ctx.cfg, ctx.with_reference)

    def needs_reference(self, cfg: Config) -> bool:
        return False  # SFT builds no reference model


class FastSFTStep(SFTStep):
    """SFT on padding-free rows (speed.packing) and/or with the chunked LM head (speed.chunked_logps)."""

    def __init__(self, speed: SpeedConfig, attn_implementation: str | None = None) -> None:
        self._collate = make_sft_collate(speed, attn_implementation)

    def collate(self, examples: list[TokenizedCompletion], pad_token_id: int) -> dict:
        return self._collate(examples, pad_token_id)

    def forward(self, policy, reference, batch: dict, ctx: StepContext) -> tuple:
        return forward_sft_fast(policy, reference, batch, ctx.cfg, ctx.with_reference)

    def plain(self) -> Step:
        return SFTStep()
