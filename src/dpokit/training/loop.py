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
Why a run stops after a step and how it ends are finish.py's; what each step adds to the metrics window and the
run's counters, and the record made of them every logging_steps, step_log.py's.
"""

from __future__ import annotations

import math
import time

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
from dpokit.training.export import save_final
from dpokit.training.finish import finish, stop_reason, too_many_skipped
from dpokit.training.fsdp import clip_grad_norm
from dpokit.training.metrics import MetricSums
from dpokit.training.non_finite import likely_cause
from dpokit.training.optim import make_optimizer, make_schedule, total_steps_for
from dpokit.training.resume import start_or_resume
from dpokit.training.adaptive_beta import AdaptiveBeta
from dpokit.training.ref_sync import check_sync, is_sync_step, sync_reference
from dpokit.training.retention import prepare_retention
from dpokit.training.run import Progress, Run, RunSetup, StepOutcome, TrainResult
from dpokit.training.run_dir import RunDir
from dpokit.training.setup import (
    accelerator_for,
    fit_reference_sync,
    fit_speed,
    make_run_dir,
    prepare,
    reference_for,
    refuse_before_compute,
    training_data,
)
from dpokit.training.signals import TrainingInterrupted
from dpokit.training.step_log import count_step, log_window
from dpokit.training.step_runner import accumulate_gradients, agree, evaluate
from dpokit.training.tracking import accelerator_kwargs, init_trackers

__all__ = [
    "Step",
    "TrainResult",
    "TrainingInterrupted",
    "accumulate_gradients",
    "evaluate",
    "likely_cause",
    "save_final",
    "train",
]


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
    # No data.path; FlexAttention on CPU; sharding's limits.
    refuse_before_compute(cfg, accelerator.distributed_type.value)
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
    """Setup's stages in the claimed run directory: the data and the policy, the config and step fitted to them, the
    reference, the optimizer and schedule, then where the run starts (fresh or resumed) and what it runs with."""
    init_trackers(accelerator, cfg)
    tokenizer = load_tokenizer(cfg)
    objective = step_for(cfg)
    data = training_data(cfg, objective, tokenizer, data, owner.path, accelerator.is_main_process)
    policy = _load_policy_for(cfg, data)
    with_reference = objective.needs_reference(cfg)  # reference-free losses (and SFT) build and run no reference
    cfg, objective = _fit_to_policy(owner, cfg, objective, policy, accelerator)
    # train.fsdp: the policy (and a live reference) come back sharded
    policy, reference, data = reference_for(cfg, objective, policy, tokenizer, data, accelerator, with_reference)
    if cfg.loss.ref_sync_steps > 0:
        check_sync(cfg, reference, policy, is_sharded(accelerator) or cfg.train.fsdp)
    policy.train()
    optimizer, scheduler, total_steps, micro_per_epoch = _optimizer_and_schedule(
        cfg, policy, len(data.train), accelerator
    )
    policy, optimizer, scheduler, reference = prepare(accelerator, cfg, policy, optimizer, scheduler, reference)
    cached = with_reference and cfg.speed.ref_cache and objective.reads_reference_cache
    # Before a checkpoint's weights are loaded: the reference's NLL.
    retention = prepare_retention(cfg, tokenizer, policy, reference, cached, accelerator, data.side.get("retention"))
    # Under FSDP, Accelerate clips through the wrapper, which it recognises by its whole parameter list.
    params = (
        list(policy.parameters()) if is_sharded(accelerator) else [p for p in policy.parameters() if p.requires_grad]
    )
    progress = _progress_at_start(
        accelerator, cfg, owner.path, data.train, total_steps, policy, optimizer, scheduler, reference, tokenizer
    )
    gen_prompts = _generation_prompts(cfg, data, tokenizer, accelerator)
    fixed = RunSetup(
        cfg=cfg,
        accelerator=accelerator,
        run_dir=owner.path,
        tokenizer=tokenizer,
        objective=objective,
        data=data,
        policy=policy,
        reference=reference,
        with_reference=with_reference,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=total_steps,
        micro_per_epoch=micro_per_epoch,
        params=params,
        gen_prompts=gen_prompts,
        retention=retention,
        mix=SFTMix.from_config(
            cfg, tokenizer, accelerator.process_index, accelerator.num_processes, data.side.get("sft_mix")
        ),
        beta_schedule=AdaptiveBeta(cfg.loss, accelerator, progress.state)
        if cfg.loss.beta_schedule == "adaptive"
        else None,
        owner=owner,
    )
    return Run(fixed, progress)


def _load_policy_for(cfg: Config, data: PreparedData):
    """The policy, loaded whole; a ConfigError, before any forward, when the data is longer than its context (past it a
    model computes what it never learned, or raises IndexError)."""
    with loaded_whole():  # under DeepSpeed ZeRO-3 too: the reference is its deep copy, partitioned after
        policy = load_policy(cfg)
    longest = longest_sequence(data.train + data.eval)
    problem = context_length_problem(cfg.data.max_length, getattr(policy, "config", None), longest)
    if problem:
        raise ConfigError(problem)
    return policy


def _fit_to_policy(
    owner: RunDir, cfg: Config, objective: Step, policy, accelerator: Accelerator
) -> tuple[Config, Step]:
    """The config and step fitted to the loaded policy and the setup (a moving reference, the fast step, a sharded LM
    head); the main process says each adjustment and saves the config that runs."""
    cfg, sync_notes = fit_reference_sync(cfg, objective)
    cfg, objective, notes = fit_speed(
        cfg, objective, policy, is_sharded(accelerator)
    )  # FSDP2 gathers the head in its forward
    for note in sync_notes + notes + cpu_threads_note(policy) if accelerator.is_main_process else []:
        print(f"[dpokit] {note}", flush=True)
    if accelerator.is_main_process:  # the config that runs, after every adjustment, each recorded
        owner.save_config(cfg, sync_notes + notes)
    return cfg, objective


def _optimizer_and_schedule(cfg: Config, policy, n_train: int, accelerator: Accelerator) -> tuple:
    """(optimizer, scheduler, total_steps, micro_per_epoch): AdamW, and its schedule over the run's optimizer steps
    (train.max_steps, else train.epochs over the data in global micro-batches)."""
    optimizer = make_optimizer(cfg, policy, is_sharded(accelerator) or cfg.train.fsdp)
    micro_per_epoch = math.ceil(n_train / (cfg.train.batch_size * accelerator.num_processes))
    total_steps = total_steps_for(cfg, micro_per_epoch)
    return optimizer, make_schedule(cfg, optimizer, total_steps), total_steps, micro_per_epoch


def _progress_at_start(
    accelerator: Accelerator,
    cfg: Config,
    run_dir,
    train_examples: list,
    total_steps: int,
    policy,
    optimizer,
    scheduler,
    reference,
    tokenizer,
) -> Progress:
    """Where the run starts: the state resumed from (resume.start_or_resume) or fresh, the detectors replaying the kept
    metrics records, the last logged training record, and the empty-data guard."""
    detectors = FailureDetectors(cfg.detectors)
    state, window, log = start_or_resume(
        accelerator,
        cfg,
        run_dir,
        train_examples,
        total_steps,
        policy,
        optimizer,
        scheduler,
        detectors,
        accelerator.unwrap_model(reference) if reference is not None else None,
    )
    last_logged = next((r for r in reversed(getattr(log, "kept", [])) if "loss" in r), {})
    return Progress(
        state=state,
        window=window,
        log=log,
        last_logged=last_logged,
        detectors=detectors,
        empty_data=EmptyDataGuard(type(tokenizer).__name__),
        step=state.step,
    )


def _generation_prompts(cfg: Config, data: PreparedData, tokenizer, accelerator: Accelerator) -> list:
    """train.eval_generate: the eval prompts sampled at every evaluation (none without eval data, said once)."""
    gen_prompts = eval_prompts(data.eval, tokenizer, cfg.train.eval_generate) if cfg.train.eval_generate > 0 else []
    if cfg.train.eval_generate > 0 and not gen_prompts and accelerator.is_main_process:
        print("[dpokit] train.eval_generate is set but there is no eval data: no completions are sampled", flush=True)
    return gen_prompts


# --- the optimizer steps -----------------------------------------------------------------------


def run_steps(run: Run) -> None:
    """Optimizer steps from where the run is to train.max_steps (or its epochs), or until it has to stop."""
    fixed, progress = run.setup, run.progress
    cfg, state = fixed.cfg, progress.state
    if (fixed.gen_prompts or fixed.retention) and state.step == 0:
        # the baselines length_drift and the retention curve start from
        run.log_and_diagnose({"step": 0, **run.generate_on_eval(), **run.retention_metrics()})
    progress.stream = BatchStream(
        len(fixed.data.train),
        cfg.train.batch_size,
        cfg.train.seed,
        rank=fixed.accelerator.process_index,
        world=fixed.accelerator.num_processes,
        position=state.micro_seen,
    )
    progress.bar = tqdm(
        total=fixed.total_steps,
        initial=state.step,
        disable=not (run.is_main and cfg.train.progress_bar),
        desc=fixed.objective.name,
        dynamic_ncols=True,
    )
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
            # A NaN evaluation: the weights are suspect.
            corrupted = state.stop_reason == "non_finite" and not too_many_skipped(run)
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
    cfg, accelerator, objective = fixed.cfg, fixed.accelerator, fixed.objective
    micro = [
        micro_batch(
            fixed.data.train,
            progress.stream,
            objective.collate,
            fixed.tokenizer.pad_token_id,
            objective.weight,
            objective.tokens,
        )
        for _ in range(cfg.train.grad_accum)
    ]
    tokens = (
        step_completion_tokens(accelerator, [m.batch for m in micro if not m.dummy])
        if progress.empty_data.watching(step)
        else None
    )
    step_sums = MetricSums()
    job = run.step_job(step)  # the models, the step, and its context: mixed SFT batches, beta-DPO's M_0, throughput
    accumulate_gradients(
        job, [m.batch for m in micro], step_sums, sum(m.examples for m in micro), [m.dummy for m in micro]
    )
    run.end_step(job)
    grad_norm = clip_grad_norm(
        accelerator, fixed.policy, fixed.params, cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
    )
    grad_norm = math.nan if grad_norm is None else float(grad_norm)
    local_loss = step_sums.sums.get("loss", 0.0) / max(step_sums.counts.get("loss", 0.0), 1.0)
    progress.bad_loss, stop_requested = agree(
        accelerator, not math.isfinite(local_loss), progress.signals.signum is not None
    )
    learning_rate = fixed.scheduler.get_last_lr()[0]
    bad = progress.bad_loss or not math.isfinite(grad_norm)
    _update(run, step, bad)
    overflow = (
        bad and accelerator.scaler is not None and not progress.bad_loss
    )  # the loss scaler's business, not a fault
    outcome = StepOutcome(local_loss, grad_norm, learning_rate, bad, overflow, stop_requested, tokens)
    count_step(run, step, step_sums, outcome, tokens_seen=sum(m.tokens for m in micro))
    return outcome


def _update(run: Run, step: int, bad: bool) -> None:
    """AdamW (not on a bad step, but under fp16's loss scaler), zero_grad and the schedule; TR-DPO's reference moves."""
    fixed, accelerator, cfg = run.setup, run.setup.accelerator, run.setup.cfg
    if accelerator.scaler is not None or not bad:
        fixed.optimizer.step()  # under fp16 the loss scaler itself skips a non-finite update and lowers its scale
    fixed.optimizer.zero_grad(set_to_none=True)
    fixed.scheduler.step()  # a skipped update still uses its step of the schedule (and its data)
    if is_sync_step(cfg, step):  # TR-DPO, after the update as TRL: ref <- alpha * policy + (1 - alpha) * ref
        sync_reference(
            accelerator.unwrap_model(fixed.reference), accelerator.unwrap_model(fixed.policy), cfg.loss.ref_sync_alpha
        )
        run.progress.state.ref_syncs += 1
