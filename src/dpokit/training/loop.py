"""The training loop: one readable file, on Accelerate.

    resume (train.resume) from the latest complete checkpoint, or start fresh
    for each optimizer step:
        take grad_accum global micro-batches; this process trains on its slice of each
        policy forward (+ reference forward, no grad) -> per-sequence log-probs
        loss table -> per-example losses; backward on sum / examples in the whole step
        a NaN/Inf loss or gradient skips the update (counted; the run stops past train.max_skipped_steps)
        clip, AdamW step, schedule step; every loss.ref_sync_steps: the reference moves (TR-DPO, ref_sync.py)
        every logging_steps: metrics averaged over all applied micro-batches and ranks -> metrics.jsonl
        every eval_steps: the same metrics on held-out pairs, prefixed eval_ (with train.eval_generate=N,
            also eval_mean_length of N sampled completions, for the length detector; with data.retention_path, retention/*)
        every record also goes to the trackers of train.report_to (TensorBoard, W&B, MLflow)
        every save_steps, on SIGTERM/SIGINT, and at the end: a checkpoint (checkpoint.py)
    save the final model (full, LoRA adapter, or merged) with its tokenizer (export.py)

`train` is setup -> run_steps -> finish; everything a run holds between them is one `Run`: what setup decided
(`run.setup`, frozen) and where the run is (`run.progress`: its RunState, metrics window, stream, step, ...).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from dpokit.config import Config, ConfigError, resolve_paths
from dpokit.data.batching import BatchStream, micro_batch
from dpokit.data.prepare import PreparedData
from dpokit.data.records import DataError
from dpokit.demo.assets import load_resolved_config
from dpokit.data.token_health import context_length_problem, longest_sequence
from dpokit.cpu_threads import cpu_threads_note
from dpokit.models import load_policy, load_tokenizer
from dpokit.sharding import release_process_group
from dpokit.reference import loaded_whole
from dpokit.steps import Step, step_for
from dpokit.steps.sft_mix import SFTMix
from dpokit.training.checkpoint import is_sharded
from dpokit.detectors import FailureDetectors
from dpokit.training.empty_data import EmptyDataGuard, step_completion_tokens
from dpokit.training.eval_generation import eval_prompts
from dpokit.training.export import gathered_state, save_final
from dpokit.training.fsdp import clip_grad_norm
from dpokit.training.metrics import MetricSums
from dpokit.training.model_card import RunFacts
from dpokit.training.non_finite import likely_cause
from dpokit.training.optim import make_optimizer, make_schedule, total_steps_for
from dpokit.training.resume import start_or_resume
from dpokit.training.adaptive_beta import AdaptiveBeta
from dpokit.training.ref_sync import check_sync, is_sync_step, sync_reference
from dpokit.training.retention import prepare_retention
from dpokit.training.run import Progress, Run, RunSetup, StepOutcome, TrainResult
from dpokit.training.run_dir import RunDir
from dpokit.training.setup import (accelerator_for, fit_reference_sync, fit_speed, make_run_dir, prepare, reference_for, refuse_before_compute,
                                   training_data)
from dpokit.training.signals import TrainingInterrupted, resume_command
from dpokit.training.step_runner import accumulate_gradients, agree, evaluate, keep_step
from dpokit.training.tracking import accelerator_kwargs, end_trackers, init_trackers

__all__ = ["Step", "TrainResult", "TrainingInterrupted", "accumulate_gradients", "evaluate", "likely_cause", "save_final", "train"]


def train(config, overrides=None, data: PreparedData | None = None) -> TrainResult:
    """Run one DPO job. `config`: a Config, a dict, or a YAML path; `overrides`: ["key=value"] or {key: value}."""
    run = setup(load_resolved_config(config, overrides), data)  # "demo:..." paths build the embedded demo's model/data
    try:
        run_steps(run)
        return finish(run)
    finally:
        run.setup.owner.release()  # the run directory's lock goes on any exit (run_dir.py)
        release_process_group()  # train.fsdp in a lone process made a group of one


# --- setup -------------------------------------------------------------------------------------


def setup(cfg: Config, data: PreparedData | None) -> Run:
    """The run directory, data, policy and reference, optimizer and schedule, and the state resumed from (or fresh)."""
    transformers.utils.logging.disable_progress_bar()  # keep the console for our own summary and progress
    cfg = resolve_paths(cfg)  # demo: paths were resolved as the config was loaded (train)
    # The schedule advances once per optimizer step, whatever the number of processes (see BatchStream).
    accelerator = accelerator_for(cfg, **accelerator_kwargs(cfg))  # a fresh mixed-precision state in a lone process
    refuse_before_compute(cfg, accelerator.distributed_type.value)  # no data.path; FlexAttention on CPU; sharding's limits
    set_seed(cfg.train.seed)
    owner = make_run_dir(cfg, accelerator)
    try:
        run = _set_up_in(owner, cfg, data, accelerator)
    except BaseException:
        owner.abandon()  # a failed config or data check leaves no out_dir behind (nor its lock)
        release_process_group()
        raise
    return owner.ready(run)  # the checks passed: now an earlier model's eval.json is set aside


def _set_up_in(owner: RunDir, cfg: Config, data: PreparedData | None, accelerator: Accelerator) -> Run:
    run_dir = owner.path
    init_trackers(accelerator, cfg)

    tokenizer = load_tokenizer(cfg)
    objective = step_for(cfg)
    data = training_data(cfg, objective, tokenizer, data, run_dir, accelerator.is_main_process)
    with loaded_whole():  # under DeepSpeed ZeRO-3 too: the reference is its deep copy, partitioned after
        policy = load_policy(cfg)
    longest = longest_sequence(data.train + data.eval)
    problem = context_length_problem(cfg.data.max_length, getattr(policy, "config", None), longest)
    if problem:  # before any forward: past its context a model computes what it never learned (or raises IndexError)
        raise ConfigError(problem)
    with_reference = objective.needs_reference(cfg)  # reference-free losses (and SFT) build and run no reference
    cfg, sync_notes = fit_reference_sync(cfg, objective)
    sharded = is_sharded(accelerator) or cfg.train.fsdp
    cfg, objective, notes = fit_speed(cfg, objective, policy, is_sharded(accelerator))  # FSDP2 gathers the head in its forward
    for note in sync_notes + notes + cpu_threads_note(policy) if accelerator.is_main_process else []:
        print(f"[dpokit] {note}", flush=True)
    if accelerator.is_main_process:  # the config that runs, after every adjustment, each recorded
        owner.save_config(cfg, sync_notes + notes)
    policy, reference, data = reference_for(cfg, objective, policy, tokenizer, data, accelerator, with_reference)  # train.fsdp: sharded
    if cfg.loss.ref_sync_steps > 0:
        check_sync(cfg, reference, policy, sharded)
    policy.train()

    optimizer = make_optimizer(cfg, policy, sharded)
    micro_per_epoch = math.ceil(len(data.train) / (cfg.train.batch_size * accelerator.num_processes))
    total_steps = total_steps_for(cfg, micro_per_epoch)
    scheduler = make_schedule(cfg, optimizer, total_steps)
    policy, optimizer, scheduler, reference = prepare(accelerator, cfg, policy, optimizer, scheduler, reference)
    retention = prepare_retention(cfg, tokenizer, policy, reference, with_reference and cfg.speed.ref_cache and objective.reads_reference_cache,
                                  accelerator, data.side.get("retention"))  # before a checkpoint's weights are loaded: the reference's NLL
    # Under FSDP, Accelerate clips through the wrapper, which it recognises by its whole parameter list.
    params = list(policy.parameters()) if is_sharded(accelerator) else [p for p in policy.parameters() if p.requires_grad]

    detectors = FailureDetectors(cfg.detectors)
    state, window, log = start_or_resume(accelerator, cfg, run_dir, data.train, total_steps, policy, optimizer, scheduler, detectors,
                                         accelerator.unwrap_model(reference) if reference is not None else None)
    last_logged = next((r for r in reversed(getattr(log, "kept", [])) if "loss" in r), {})
    gen_prompts = eval_prompts(data.eval, tokenizer, cfg.train.eval_generate) if cfg.train.eval_generate > 0 else []
    if cfg.train.eval_generate > 0 and not gen_prompts and accelerator.is_main_process:
        print("[dpokit] train.eval_generate is set but there is no eval data: no completions are sampled", flush=True)
    fixed = RunSetup(cfg=cfg, accelerator=accelerator, run_dir=run_dir, tokenizer=tokenizer, objective=objective, data=data, policy=policy,
                     reference=reference, with_reference=with_reference, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
                     micro_per_epoch=micro_per_epoch, params=params, gen_prompts=gen_prompts, retention=retention,
                     mix=SFTMix.from_config(cfg, tokenizer, accelerator.process_index, accelerator.num_processes, data.side.get("sft_mix")),
                     beta_schedule=AdaptiveBeta(cfg.loss, accelerator, state) if cfg.loss.beta_schedule == "adaptive" else None, owner=owner)
    return Run(fixed, Progress(state=state, window=window, log=log, last_logged=last_logged, detectors=detectors,
                               empty_data=EmptyDataGuard(type(tokenizer).__name__), step=state.step))


# --- the optimizer steps -----------------------------------------------------------------------


def run_steps(run: Run) -> None:
    """Optimizer steps from where the run is to train.max_steps (or its epochs), or until it has to stop."""
    fixed, progress = run.setup, run.progress
    cfg, state = fixed.cfg, progress.state
    if (fixed.gen_prompts or fixed.retention) and state.step == 0:  # the baselines length_drift and the retention curve start from
        run.log_and_diagnose({"step": 0, **run.generate_on_eval(), **run.retention_metrics()})
    progress.stream = BatchStream(len(fixed.data.train), cfg.train.batch_size, cfg.train.seed, rank=fixed.accelerator.process_index,
                                  world=fixed.accelerator.num_processes, position=state.micro_seen)
    progress.bar = tqdm(total=fixed.total_steps, initial=state.step, disable=not (run.is_main and cfg.train.progress_bar),
                        desc=fixed.objective.name, dynamic_ncols=True)
    progress.started = time.time()
    with progress.signals:
        for step in range(state.step + 1, fixed.total_steps + 1):
            progress.step = step
            outcome = optimizer_step(run, step)
            progress.bar.update(1)
            if step % cfg.train.logging_steps == 0 or step == fixed.total_steps:
                log_window(run, step, outcome.learning_rate)
            problem = progress.empty_data.update(step, outcome.completion_tokens, outcome.grad_norm)
            if problem:  # the tokenizer or the data, not the optimisation: a DataError (`dpokit train` exits 2)
                progress.bar.close()
                raise DataError(problem)
            state.stop_reason = stop_reason(run, step, outcome)
            corrupted = state.stop_reason == "non_finite" and not _too_many_skipped(run)  # a NaN evaluation: the weights are suspect
            periodic = cfg.train.save_steps > 0 and (step % cfg.train.save_steps == 0 or step == fixed.total_steps)
            if (periodic or state.stop_reason) and not corrupted:
                state.finished = step == fixed.total_steps and not state.stop_reason
                progress.saved_at = run.checkpoint()
            if state.stop_reason:
                break
    progress.bar.close()


def optimizer_step(run: Run, step: int) -> StepOutcome:
    """The step's micro-batches forward and backward, clip, AdamW and schedule; a non-finite loss or gradient skips the update."""
    fixed, progress = run.setup, run.progress
    cfg, accelerator, objective, state = fixed.cfg, fixed.accelerator, fixed.objective, progress.state
    micro = [micro_batch(fixed.data.train, progress.stream, objective.collate, fixed.tokenizer.pad_token_id, objective.weight, objective.tokens)
             for _ in range(cfg.train.grad_accum)]
    tokens = step_completion_tokens(accelerator, [m.batch for m in micro if not m.dummy]) if progress.empty_data.watching(step) else None
    step_sums = MetricSums()
    job = run.step_job(step)  # the models, the step, and its context: mixed SFT batches, beta-DPO's M_0, throughput
    accumulate_gradients(job, [m.batch for m in micro], step_sums, sum(m.examples for m in micro), [m.dummy for m in micro])
    run.end_step(job)
    grad_norm = clip_grad_norm(accelerator, fixed.policy, fixed.params, cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf)
    grad_norm = math.nan if grad_norm is None else float(grad_norm)
    local_loss = step_sums.sums.get("loss", 0.0) / max(step_sums.counts.get("loss", 0.0), 1.0)
    progress.bad_loss, stop_requested = agree(accelerator, not math.isfinite(local_loss), progress.signals.signum is not None)
    learning_rate = fixed.scheduler.get_last_lr()[0]
    bad = progress.bad_loss or not math.isfinite(grad_norm)
    if accelerator.scaler is not None or not bad:
        fixed.optimizer.step()  # under fp16 the loss scaler itself skips a non-finite update and lowers its scale
    fixed.optimizer.zero_grad(set_to_none=True)
    fixed.scheduler.step()  # a skipped update still uses its step of the schedule (and its data)
    if is_sync_step(cfg, step):  # TR-DPO, after the update as TRL: ref <- alpha * policy + (1 - alpha) * ref
        sync_reference(accelerator.unwrap_model(fixed.reference), accelerator.unwrap_model(fixed.policy), cfg.loss.ref_sync_alpha)
        state.ref_syncs += 1
    keep_step(progress.window, step_sums, keep=not bad)
    progress.window.add_scalar("grad_norm", grad_norm if not bad else 0.0, 0.0 if bad else 1.0)
    state.step, state.micro_seen = step, progress.stream.position
    state.tokens_seen += sum(m.tokens for m in micro)
    overflow = bad and accelerator.scaler is not None and not progress.bad_loss  # the loss scaler's business, not a fault
    state.overflow_steps += int(overflow)
    if bad and not overflow:
        state.skipped_steps += 1
        reason = "non-finite loss" if progress.bad_loss else "non-finite gradient"
        progress.log.write({"step": step, "skipped_step": {"reason": reason, "loss": local_loss, "grad_norm": grad_norm},
                            "skipped_steps": state.skipped_steps})
        if run.is_main:
            tqdm.write(f"[dpokit] step {step}: {reason} (loss={local_loss:.4g}, grad_norm={grad_norm:.4g}); update skipped "
                       f"({state.skipped_steps} of at most train.max_skipped_steps={cfg.train.max_skipped_steps})")
    return StepOutcome(local_loss, grad_norm, learning_rate, bad, overflow, stop_requested, tokens)


def log_window(run: Run, step: int, learning_rate: float) -> None:
    """One metrics record: the window's sums averaged over its micro-batches and ranks, then the counters."""
    fixed, progress = run.setup, run.progress
    state = progress.state
    record = {k: v for k, v in progress.window.reduce(fixed.accelerator).items() if math.isfinite(v)}  # no applied step: no value
    progress.window.clear()
    record.update(step=step, epoch=round(progress.stream.position / fixed.micro_per_epoch, 4), learning_rate=learning_rate,
                  skipped_steps=state.skipped_steps)
    record["num_tokens"] = state.tokens_seen  # TRL's running count of the input tokens trained on
    record.update(progress.throughput.record(fixed.accelerator, fixed.policy))  # tokens_per_second, padding_fraction, mfu
    if state.overflow_steps:
        record["overflow_steps"] = state.overflow_steps
    run.log_and_diagnose(record)
    if "loss" in record:
        progress.last_logged = record
        accuracy = record.get("rewards/accuracies", record.get("mean_token_accuracy", math.nan))
        progress.bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{accuracy:.2f}")


def stop_reason(run: Run, step: int, outcome: StepOutcome) -> Optional[str]:
    """Why the run stops after this step (None: it goes on); evaluates at train.eval_steps on the way."""
    progress = run.progress
    if outcome.bad and not outcome.overflow and _too_many_skipped(run):
        # The detectors' non_finite stop, with the offending values; our own message follows the loop.
        run.log_and_diagnose({"step": step, "loss": outcome.loss, "grad_norm": outcome.grad_norm, "skipped_steps": progress.state.skipped_steps})
        return "non_finite"
    cfg, total_steps = run.setup.cfg, run.setup.total_steps
    if run.evaluates and cfg.train.eval_steps > 0 and step % cfg.train.eval_steps == 0 and step != total_steps:
        run.log_and_diagnose(run.eval_record(step))
    if progress.detectors.should_stop:
        return next(d for d in reversed(progress.detectors.fired) if d.severity == "stop").mode
    return "signal" if outcome.stop_requested else None


def _too_many_skipped(run: Run) -> bool:
    return run.progress.state.skipped_steps > run.setup.cfg.train.max_skipped_steps


# --- the end of the run ------------------------------------------------------------------------


def finish(run: Run) -> TrainResult:
    """The final evaluation and model; or, for a run that stopped early, why, and how to resume it."""
    fixed, progress = run.setup, run.progress
    cfg, accelerator, state, detectors = fixed.cfg, fixed.accelerator, progress.state, progress.detectors
    final = dict(progress.last_logged)
    final["train_runtime"] = round(time.time() - progress.started, 2)
    final["diagnoses"] = [d.mode for d in detectors.fired]
    final["skipped_steps"] = state.skipped_steps
    world = accelerator.num_processes
    if state.stop_reason == "signal":
        command = resume_command(cfg, fixed.run_dir, world)
        message = (f"[dpokit] stopped at step {progress.step} of {fixed.total_steps}; checkpoint saved to {progress.saved_at}. "
                   f"Resume with:\n  {command}")
        if run.is_main:
            print(message, flush=True)
        raise TrainingInterrupted(message, progress.saved_at, command, progress.signals.signum)
    if state.stop_reason == "non_finite" and _too_many_skipped(run):
        if run.is_main:
            print(f"[dpokit] stopped at step {progress.step}: {state.skipped_steps} steps had a non-finite loss or gradient "
                  f"(more than train.max_skipped_steps={cfg.train.max_skipped_steps}). Likely cause: "
                  f"{likely_cause(cfg, progress.bad_loss, progress.step - state.skipped_steps)}. The last finite weights are in "
                  f"{progress.saved_at}; after changing the settings, resume with:\n  {resume_command(cfg, fixed.run_dir, world)}", flush=True)
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
    full_state = gathered_state(accelerator, fixed.policy)  # FSDP/DeepSpeed: a collective, every process
    if run.is_main:
        facts = RunFacts(fixed.data.summary, final, list(detectors.fired), accelerator.num_processes, progress.step)  # for the model card
        save_final(accelerator.unwrap_model(fixed.policy), fixed.tokenizer, cfg, model_dir, full_state, facts)
        print(f"[dpokit] done in {final['train_runtime']:.1f}s; model saved to {model_dir}", flush=True)
    accelerator.wait_for_everyone()
    return run.result(final, state.stop_reason)
