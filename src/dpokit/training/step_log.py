"""What each optimizer step leaves in the run's books (the loop calls both).

count_step   the step's metric sums into the logging window (a skipped update adds none) and the run state's
             counters (step, data position, tokens, overflows, skipped updates; a skipped one is logged and said)
log_window   every train.logging_steps: one metrics record, the window averaged over its micro-batches and ranks,
             then the counters
"""

from __future__ import annotations

import math

from tqdm.auto import tqdm

from dpokit.training.metrics import MetricSums
from dpokit.training.run import Run, StepOutcome
from dpokit.training.step_runner import keep_step


def count_step(run: Run, step: int, step_sums: MetricSums, outcome: StepOutcome, tokens_seen: int) -> None:
    """The step into the metrics window (a skipped update adds nothing) and the run state's counters; a skipped
    update is also logged, and said on the console."""
    progress, state, cfg = run.progress, run.progress.state, run.setup.cfg
    bad, grad_norm = outcome.bad, outcome.grad_norm
    keep_step(progress.window, step_sums, keep=not bad)
    progress.window.add_scalar("grad_norm", grad_norm if not bad else 0.0, 0.0 if bad else 1.0)
    state.step, state.micro_seen = step, progress.stream.position
    state.tokens_seen += tokens_seen
    state.overflow_steps += int(outcome.overflow)
    if bad and not outcome.overflow:
        state.skipped_steps += 1
        reason = "non-finite loss" if progress.bad_loss else "non-finite gradient"
        progress.log.write(
            {
                "step": step,
                "skipped_step": {"reason": reason, "loss": outcome.loss, "grad_norm": grad_norm},
                "skipped_steps": state.skipped_steps,
            }
        )
        if run.is_main:
            tqdm.write(
                f"[dpokit] step {step}: {reason} (loss={outcome.loss:.4g}, grad_norm={grad_norm:.4g}); update skipped "
                f"({state.skipped_steps} of at most train.max_skipped_steps={cfg.train.max_skipped_steps})"
            )


def log_window(run: Run, step: int, learning_rate: float) -> None:
    """One metrics record: the window's sums averaged over its micro-batches and ranks, then the counters."""
    fixed, progress = run.setup, run.progress
    state = progress.state
    record = {
        k: v for k, v in progress.window.reduce(fixed.accelerator).items() if math.isfinite(v)
    }  # no applied step: no value
    progress.window.clear()
    record.update(
        step=step,
        epoch=round(progress.stream.position / fixed.micro_per_epoch, 4),
        learning_rate=learning_rate,
        skipped_steps=state.skipped_steps,
    )
    record["num_tokens"] = state.tokens_seen  # TRL's running count of the input tokens trained on
    record.update(
        progress.throughput.record(fixed.accelerator, fixed.policy)
    )  # tokens_per_second, padding_fraction, mfu
    if state.overflow_steps:
        record["overflow_steps"] = state.overflow_steps
    run.log_and_diagnose(record)
    if "loss" in record:
        progress.last_logged = record
        accuracy = record.get("rewards/accuracies", record.get("mean_token_accuracy", math.nan))
        progress.bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{accuracy:.2f}")
