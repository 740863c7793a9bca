"""How a run stops and how it ends (the loop's `run_steps` asks after every step, `train` ends with `finish`).

stop_reason       after an optimizer step: why the run stops (too many non-finite steps, a detector, a signal)
                  or None; it evaluates at train.eval_steps on the way
finish            the final evaluation and model (export.py); or, for a run that stopped early, why, and how to
                  resume it
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from dpokit.training.export import gathered_state, save_final
from dpokit.training.model_card import RunFacts
from dpokit.training.non_finite import likely_cause
from dpokit.training.run import Run, StepOutcome, TrainResult
from dpokit.training.signals import TrainingInterrupted, resume_command
from dpokit.training.tracking import end_trackers


def too_many_skipped(run: Run) -> bool:
    """More updates were skipped on a non-finite loss or gradient than train.max_skipped_steps allows."""
    return run.progress.state.skipped_steps > run.setup.cfg.train.max_skipped_steps


def stop_reason(run: Run, step: int, outcome: StepOutcome) -> Optional[str]:
    """Why the run stops after this step (None: it goes on); evaluates at train.eval_steps on the way."""
    progress = run.progress
    if outcome.bad and not outcome.overflow and too_many_skipped(run):
        # The detectors' non_finite stop, with the offending values; our own message follows the loop.
        run.log_and_diagnose(
            {
                "step": step,
                "loss": outcome.loss,
                "grad_norm": outcome.grad_norm,
                "skipped_steps": progress.state.skipped_steps,
            }
        )
        return "non_finite"
    cfg, total_steps = run.setup.cfg, run.setup.total_steps
    if run.evaluates and cfg.train.eval_steps > 0 and step % cfg.train.eval_steps == 0 and step != total_steps:
        run.log_and_diagnose(run.eval_record(step))
    if progress.detectors.should_stop:
        return next(d for d in reversed(progress.detectors.fired) if d.severity == "stop").mode
    return "signal" if outcome.stop_requested else None


def finish(run: Run) -> TrainResult:
    """The final evaluation and model; or, for a run that stopped early, why, and how to resume it."""
    fixed, progress = run.setup, run.progress
    accelerator, state, detectors = fixed.accelerator, progress.state, progress.detectors
    final = dict(progress.last_logged)
    final["train_runtime"] = round(time.time() - progress.started, 2)
    final["diagnoses"] = [d.mode for d in detectors.fired]
    final["skipped_steps"] = state.skipped_steps
    if state.stop_reason == "signal":
        raise _interrupted(run)
    if state.stop_reason == "non_finite" and too_many_skipped(run):
        if run.is_main:
            print(_too_many_skipped_message(run), flush=True)
        return run.result(final, state.stop_reason)
    if run.evaluates:
        final_eval = run.eval_record(progress.step)
        run.log_and_diagnose(final_eval)
        final.update({k: v for k, v in final_eval.items() if k != "step"})
    end_trackers(accelerator)
    accelerator.wait_for_everyone()
    model_dir = fixed.run_dir / "final"
    if any(d.mode == "non_finite" for d in detectors.fired):
        # The weights are most likely NaN by now; saving them would hand the user a broken model.
        if run.is_main:
            print(f"[dpokit] stopped on a non-finite loss or gradient; no final model saved to {model_dir}", flush=True)
        return run.result(final, "non_finite")
    _save_final_model(run, final, model_dir)
    return run.result(final, state.stop_reason)


def _interrupted(run: Run) -> TrainingInterrupted:
    """A run stopped by SIGTERM/SIGINT: where its checkpoint is and the command that resumes it, said by the main process."""
    fixed, progress = run.setup, run.progress
    command = resume_command(fixed.cfg, fixed.run_dir, fixed.accelerator.num_processes)
    message = (
        f"[dpokit] stopped at step {progress.step} of {fixed.total_steps}; checkpoint saved to {progress.saved_at}. "
        f"Resume with:\n  {command}"
    )
    if run.is_main:
        print(message, flush=True)
    return TrainingInterrupted(message, progress.saved_at, command, progress.signals.signum)


def _too_many_skipped_message(run: Run) -> str:
    """Past train.max_skipped_steps: the likely cause, the last finite weights, and how to resume after a change."""
    fixed, progress = run.setup, run.progress
    cfg, state = fixed.cfg, progress.state
    cause = likely_cause(cfg, progress.bad_loss, progress.step - state.skipped_steps)
    command = resume_command(cfg, fixed.run_dir, fixed.accelerator.num_processes)
    return (
        f"[dpokit] stopped at step {progress.step}: {state.skipped_steps} steps had a non-finite loss or gradient "
        f"(more than train.max_skipped_steps={cfg.train.max_skipped_steps}). Likely cause: {cause}. The last finite "
        f"weights are in {progress.saved_at}; after changing the settings, resume with:\n  {command}"
    )


def _save_final_model(run: Run, final: dict, model_dir: Path) -> None:
    """The trained model, with its tokenizer and model card, into final/ (export.save_final); every process takes part."""
    fixed, progress = run.setup, run.progress
    accelerator = fixed.accelerator
    full_state = gathered_state(accelerator, fixed.policy)  # FSDP/DeepSpeed: a collective, every process
    if run.is_main:
        fired = list(progress.detectors.fired)
        facts = RunFacts(
            fixed.data.summary, final, fired, accelerator.num_processes, progress.step
        )  # for the model card
        save_final(accelerator.unwrap_model(fixed.policy), fixed.tokenizer, fixed.cfg, model_dir, full_state, facts)
        print(f"[dpokit] done in {final['train_runtime']:.1f}s; model saved to {model_dir}", flush=True)
    accelerator.wait_for_everyone()
