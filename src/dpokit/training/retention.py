"""The retention set: how much the run forgets of text it should keep (data.retention_path).

At each evaluation (and once before the first step) the policy's token-mean NLL on the
retention examples' completions is logged beside the reference's:

    retention/nll        sum of -log pi(y_t | x, y_<t) over every completion token / completion tokens
    retention/nll_ref    the same for the reference (nats per token)
    retention/nll_delta  retention/nll - retention/nll_ref: > 0 is forgetting; the `forgetting` detector reads it

The reference never changes, so its NLL is computed once, at setup, before any update:
  - reference log-probs from the cache (speed.ref_cache): cached on disk too (ref_cache/retention.py);
  - a live reference model: that model; a LoRA policy: its adapters off (reference.reference_mode);
  - no reference (reference-free losses, train.task=sft): the starting policy, which is what forgetting is measured against.
The policy's NLL is sharded over the processes (each scores its slice, the sums are reduced).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dpokit.config import Config
from dpokit.data.batching import BatchStream, micro_batch, pad_id, to_device
from dpokit.data.sft import prepare_sft_file
from dpokit.ref_cache.retention import cached_reference_nll
from dpokit.reference import reference_mode
from dpokit.steps.sft import collate_sft, forward_sft
from dpokit.training.metrics import MetricSums


@dataclass
class RetentionSet:
    examples: list  # TokenizedCompletion
    nll_ref: float  # the reference's token-mean NLL (nats per token)
    batch_size: int

    def metrics(self, policy, accelerator) -> dict:
        """retention/nll, retention/nll_ref, retention/nll_delta of the policy now."""
        was_training = policy.training
        policy.eval()
        sums = MetricSums()
        stream = BatchStream(
            len(self.examples),
            self.batch_size,
            0,
            shuffle=False,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
        with torch.no_grad():
            for _ in range(stream.per_epoch):  # every process runs every batch (a dummy when its slice is empty)
                micro = micro_batch(self.examples, stream, collate_sft, pad_id(policy))
                with accelerator.autocast():
                    _, values = forward_sft(policy, None, to_device(micro.batch, accelerator.device), None, False)
                sums.add("nll", values["loss"][:0] if micro.dummy else values["loss"])
        policy.train(was_training)
        nll = sums.reduce(accelerator)["nll"]
        return {"retention/nll": nll, "retention/nll_ref": self.nll_ref, "retention/nll_delta": nll - self.nll_ref}


def _is_peft(model) -> bool:
    return hasattr(getattr(model, "module", model), "disable_adapter")


def _scorer(examples: list, batch_size: int, accelerator):
    """(model) -> (summed completion NLL, completion tokens) over every example, no gradient; a PEFT model with adapters off."""

    def score(model) -> tuple[float, int]:
        total, tokens = 0.0, 0
        ref = reference_mode(model, None) if _is_peft(model) else contextlib.nullcontext(model)
        was_training = model.training
        model.eval()
        with ref as scored, torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = to_device(collate_sft(examples[start : start + batch_size], pad_id(model)), accelerator.device)
                with accelerator.autocast():
                    out, values = forward_sft(scored, None, batch, None, False)
                total += float(out.losses.sum())
                tokens += int(values["loss"].numel())
        model.train(was_training)
        return total, tokens

    return score


def prepare_retention(
    cfg: Config, tokenizer, policy, reference, reads_cache: bool, accelerator, examples: list | None = None
) -> RetentionSet | None:
    """The retention set with its reference NLL, or None when data.retention_path is unset.

    Call before any update and before a checkpoint's weights are loaded: the policy is then the
    starting model (with LoRA: its adapters are turned off for the reference's NLL anyway).
    reads_cache: the run's reference log-probs come from the on-disk cache (so does the retention NLL).
    examples: the file's, already prepared (training.setup.training_data prints and saves their skip
    report with the data summary); else it is prepared here and its skips are printed here.
    """
    if not cfg.data.retention_path:
        return None
    summary = None
    if examples is None:
        examples, summary = prepare_sft_file(cfg.data.retention_path, "data.retention_path", cfg, tokenizer)
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    score = _scorer(examples, batch_size, accelerator)
    if reads_cache:
        cached = cached_reference_nll(
            cfg, tokenizer, examples, score, model=policy, write=accelerator.is_main_process, device=accelerator.device
        )
        nll_sum, tokens = cached.nll_sum, cached.tokens
        how = f"{'computed and cached in' if cached.built else 'read from'} {cached.path}"
    else:
        model = reference if reference is not None else policy
        nll_sum, tokens = score(model)
        how = (
            "the reference model"
            if reference is not None
            else "the policy with its adapters off"
            if _is_peft(policy)
            else "the starting policy (no reference model in this run)"
        )
    nll_ref = nll_sum / max(tokens, 1)
    if accelerator.is_main_process:
        reasons = ", ".join(f"{r} ({n})" for r, n in summary["skipped_by_reason"].items()) if summary else ""
        skipped = f"; {summary['rows_skipped']} rows skipped: {reasons}" if summary and summary["rows_skipped"] else ""
        print(
            f"[dpokit] retention set {cfg.data.retention_path}: {len(examples)} examples, {tokens} completion tokens{skipped}; "
            f"reference NLL {nll_ref:.4f} nats/token ({how})",
            flush=True,
        )
    return RetentionSet(examples, nll_ref, batch_size)
