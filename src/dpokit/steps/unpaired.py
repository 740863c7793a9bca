"""KTO's step for the trainer: unpaired completions, scored against a KL baseline.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306) sees one completion per example with a
desirable/undesirable label. Its reference point z0 estimates KL(pi || ref) on mismatched
(prompt, completion) pairs from the same batch, so it cannot be gamed by the examples' own
rewards. The trainer takes this step when `loss.type` is `kto` (`steps.step_for`):

    collate   B completions (B, T), plus B mismatched sequences prompt_i + completion_{(i+1) mod B}
              (a larger shift only where i+1 is the other half of the same split pair)
    forward   policy log-probs of both (the mismatched ones without gradients, as TRL), the same
              for the reference, then `kto_loss`
    count     B: the step's loss is the mean over examples, as TRL's `losses.nanmean()`

TRL's KTOTrainer pairs prompt i with completion i-1; any cyclic shift gives B mismatched pairs
from the batch's own completions, which is all the estimate needs. A batch of one has no other
completion to mismatch: z0 is 0 for it (TRL refuses batch size 1; so does `prepare` here for
training, but the last eval batch may hold a single example). z0 is estimated per micro-batch
and per process (TRL averages it over processes first).
"""

from __future__ import annotations

import torch

from dpokit.config import Config, ConfigError
from dpokit.data.collate import pad_completions
from dpokit.data.unpaired import TokenizedCompletion, prepare_unpaired
from dpokit.data.collate import IGNORE_INDEX
from dpokit.logprobs import token_logps
from dpokit.losses import LossOutput, kto_loss, validate_loss_config
from dpokit.reference import reference_mode
from dpokit.steps.base import Step, StepContext
from dpokit.steps.router_aux import add_router_aux, recording, router_for


def prepare(cfg: Config, tokenizer):
    if cfg.train.batch_size < 2:
        raise ConfigError(
            f"loss.type=kto needs train.batch_size >= 2 (got {cfg.train.batch_size}): its KL baseline pairs each "
            "prompt with another example's completion from the same batch"
        )
    return prepare_unpaired(cfg, tokenizer)


def mismatch_shift(sources: list[str]) -> int:
    """The smallest cyclic shift k >= 1 that never pairs two examples of one source row; 1 if none does.

    Unpaired rows have distinct sources, so k = 1. The two halves of a split pair share a prompt
    and sit side by side in unshuffled (eval) order: with k = 1 prompt i would meet its own other
    completion, a matched pair, and z0 would track the examples' own rewards.
    """
    n = len(sources)
    for k in range(1, n):
        if all(sources[i] != sources[(i + k) % n] for i in range(n)):
            return k
    return 1


def collate_unpaired(examples: list[TokenizedCompletion], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels: (B, T); kl_input_ids, kl_attention_mask, kl_labels: (B, T'); label: (B,) bool.

    Row i of the kl_* tensors is prompt i followed by completion (i+k) mod B, k = `mismatch_shift`
    (1 unless that would re-pair a split pair), cut to prompt i's completion budget so it respects
    data.max_length. Absent when B == 1.
    """
    batch = pad_completions([(e.prompt_ids, e.completion_ids) for e in examples], pad_token_id)
    n = len(examples)
    if n > 1:
        k = mismatch_shift([e.source for e in examples])
        mismatched = [
            (e.prompt_ids, examples[(i + k) % n].completion_ids[: e.completion_budget]) for i, e in enumerate(examples)
        ]
        batch.update(pad_completions(mismatched, pad_token_id, prefix="kl_"))
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch


def _sequence_logps(model, batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs (N,), logits (N, T, V)) of one padded batch."""
    logits = model(
        input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"], use_cache=False
    ).logits
    tok_logps, _ = token_logps(logits, batch[f"{prefix}labels"])
    return tok_logps.sum(-1), logits


def forward_unpaired(policy, reference, batch: dict, cfg: Config, with_reference: bool) -> tuple:
    """Policy and reference log-probs of one unpaired batch -> (LossOutput, metrics: name -> (n,) tensor).

    */chosen metrics hold only the desirable examples and */rejected only the undesirable ones, so
    the trainer's per-value averages are TRL's per-class means.
    """
    if not with_reference:
        raise ValueError("loss.type=kto needs reference log-probs: its rewards are log pi - log ref")
    _, weights = validate_loss_config(cfg.loss)
    labels = batch["label"].bool()
    router = router_for(policy, cfg.loss)  # None for a dense model; the KL rows and the reference are not routed for it
    with recording(policy, router) as router_logits:
        logps, logits = _sequence_logps(policy, batch)  # (B,), (B, T, V)
    has_kl = "kl_input_ids" in batch
    kl_logps = kl_ref_logps = None
    if has_kl:
        with torch.no_grad():  # z0 is detached in the loss, so its forward needs no graph (as TRL)
            kl_logps, _ = _sequence_logps(policy, batch, prefix="kl_")
    with reference_mode(policy, reference) as ref_model:
        ref_logps, _ = _sequence_logps(ref_model, batch)
        if has_kl:
            kl_ref_logps, _ = _sequence_logps(ref_model, batch, prefix="kl_")
    loss = cfg.loss
    losses, rewards, kl = kto_loss(
        logps, ref_logps, labels, kl_logps, kl_ref_logps, loss.beta, loss.desirable_weight, loss.undesirable_weight
    )
    losses = weights[0] * losses
    out = LossOutput(losses, rewards[labels], rewards[~labels])
    with torch.no_grad():
        completion = (batch["labels"][:, 1:] != IGNORE_INDEX).unsqueeze(-1)  # (B, T-1, 1)
        mean_logits = (logits[:, :-1].float() * completion).sum((1, 2)) / (completion.sum((1, 2)) * logits.shape[-1])
        # The example sits on its label's side of the reference point z0: the KTO value function
        # classifies it correctly (its loss is below half its weight). KTO's analogue of DPO's accuracy.
        correct = torch.where(labels, rewards > loss.beta * kl, rewards < loss.beta * kl)
        metrics = {
            "loss": losses.detach(),
            "kl": kl.expand(labels.shape[0]).float(),
            "rewards/chosen": rewards[labels],
            "rewards/rejected": rewards[~labels],
            "rewards/accuracies": correct.float(),
            "logps/chosen": logps.detach()[labels],
            "logps/rejected": logps.detach()[~labels],
            "logits/chosen": mean_logits[labels],
            "logits/rejected": mean_logits[~labels],
        }
    add_router_aux(router, router_logits, batch["attention_mask"], out, metrics)  # MoE: + coef * aux_loss per example
    return out, metrics


class UnpairedStep(Step):
    """KTO: unpaired completions; a step's loss is the mean over its examples, as TRL's `losses.nanmean()`."""

    name = "kto"

    def prepare(self, cfg: Config, tokenizer):
        return prepare(cfg, tokenizer)

    def collate(self, examples: list[TokenizedCompletion], pad_token_id: int) -> dict:
        return collate_unpaired(examples, pad_token_id)

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]

    def tokens(self, example: TokenizedCompletion) -> int:
        return len(example.prompt_ids) + len(example.completion_ids)  # the KL rows are not counted

    def forward(self, policy, reference, batch: dict, ctx: StepContext) -> tuple:
        return forward_unpaired(policy, reference, batch, ctx.cfg, ctx.with_reference)
