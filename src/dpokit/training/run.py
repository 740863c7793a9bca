"""What one training run holds between setup, its steps and its end: `Run`, that is what setup decided (`RunSetup`,
frozen) and where the run is (`Progress`), with the few things it does itself (log and diagnose a record, evaluate,
checkpoint, report); what one optimizer step came to (`StepOutcome`), and what `dpokit.train` returns (`TrainResult`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from tqdm.auto import tqdm

from dpokit.config import Config
from dpokit.data.batching import BatchStream
from dpokit.data.prepare import PreparedData
from dpokit.detectors import FailureDetectors
from dpokit.report import write_report
from dpokit.steps import Step
from dpokit.steps.base import StepContext
from dpokit.steps.sft_mix import SFTMix
from dpokit.training.adaptive_beta import AdaptiveBeta
from dpokit.training.checkpoint import RunState, save_checkpoint
from dpokit.training.empty_data import EmptyDataGuard
from dpokit.training.eval_generation import generation_metrics
from dpokit.training.metrics import MetricsLog, MetricSums
from dpokit.training.retention import RetentionSet
from dpokit.training.run_dir import RunDir
from dpokit.training.signals import StopSignals
from dpokit.training.step_runner import StepJob, evaluate
from dpokit.training.throughput import Throughput
from dpokit.training.tracking import log_diagnosis, log_metrics


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict  # last logged training metrics, plus eval_* from the final evaluation
    model_dir: Path
    stop_reason: Optional[str] = None  # None: finished; else why the run stopped early (no final model then)


@dataclass(frozen=True)
class RunSetup:
    """What setup decides and no step reassigns (the objects inside, the optimizer's say, still change state)."""

    cfg: Config
    accelerator: Accelerator
    run_dir: Path
    tokenizer: Any
    objective: Step
    data: PreparedData
    policy: Any
    reference: Any  # None: reference-free, or reference log-probs from the cache
    with_reference: bool
    optimizer: Any
    scheduler: Any
    total_steps: int
    micro_per_epoch: int  # global micro-batches per epoch
    params: list  # what clip_grad_norm_ clips
    gen_prompts: list  # train.eval_generate: the same eval prompts (and seed) at every evaluation
    retention: Optional[RetentionSet] = None  # data.retention_path: retention/* at every evaluation
    mix: Optional[SFTMix] = None  # data.sft_mix_path: SFT rows mixed into every step
    beta_schedule: Optional[AdaptiveBeta] = None  # loss.beta_schedule=adaptive: beta-DPO's M_0 into each step and back
    owner: Optional[RunDir] = None  # run_dir holds this run's lock until train() returns or raises

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Progress:
    """What moves as the run goes: where it is, what it has logged and saved, what its watchers have seen."""

    state: RunState
    window: MetricSums  # sums of every applied micro-batch since the last log
    log: MetricsLog  # metrics.jsonl (continued on resume)
    last_logged: dict  # the last record with a training loss
    detectors: FailureDetectors
    empty_data: EmptyDataGuard  # stops a run whose first steps have nothing to learn from
    stream: Optional[BatchStream] = None
    bar: Any = None  # the tqdm progress bar
    signals: StopSignals = field(default_factory=StopSignals)
    started: float = 0.0
    step: int = 0  # the last optimizer step taken
    bad_loss: bool = False  # the last step's loss was non-finite on some process
    saved_at: Optional[Path] = None  # the last checkpoint written
    throughput: Throughput = field(default_factory=Throughput)  # tokens/s, padding, MFU of the logging window


@dataclass
class Run:
    """One training run, from setup to the final model: what it trains, with what (`setup`), and where it is (`progress`)."""

    setup: RunSetup
    progress: Progress

    @property
    def is_main(self) -> bool:
        return self.setup.is_main

    def log_and_diagnose(self, record: dict) -> None:
        # Every rank sees the same reduced record, so all ranks agree on should_stop.
        accelerator, progress = self.setup.accelerator, self.progress
        progress.log.write(record)
        log_metrics(accelerator, record, record["step"])
        for diagnosis in progress.detectors.update(record):
            if self.is_main:
                tqdm.write(str(diagnosis))
                progress.log.write({"step": diagnosis.step, "diagnosis": dataclasses.asdict(diagnosis)})
            log_diagnosis(accelerator, diagnosis)

    def generate_on_eval(self) -> dict:
        s = self.setup
        if not s.gen_prompts:
            return {}
        # Every rank samples (cheap, and sharded models need all ranks in generate); same seed, same numbers.
        with s.accelerator.autocast():
            return generation_metrics(
                s.accelerator.unwrap_model(s.policy),
                s.tokenizer,
                s.gen_prompts,
                s.cfg.train.eval_generate,
                s.cfg.train.seed,
                max_new_tokens=s.cfg.data.max_length - s.cfg.data.max_prompt_length,
            )

    @property
    def evaluates(self) -> bool:
        return bool(self.setup.data.eval) or self.setup.retention is not None

    def retention_metrics(self) -> dict:
        s = self.setup
        return s.retention.metrics(s.policy, s.accelerator) if s.retention is not None else {}

    def job(self, ctx: StepContext) -> StepJob:
        return StepJob(self.setup.policy, self.setup.reference, self.setup.objective, ctx, self.progress.throughput)

    def step_job(self, step: int) -> StepJob:
        """Optimizer step `step`'s job: its context holds the step's mixed SFT batches and beta-DPO's M_0."""
        s = self.setup
        mixed = s.mix.draw(step, s.tokenizer.pad_token_id) if s.mix is not None else None
        beta = s.beta_schedule.for_step() if s.beta_schedule is not None else None
        return self.job(StepContext(s.cfg, s.with_reference, beta=beta, mixed=mixed, group=s.accelerator))

    def end_step(self, job: StepJob) -> None:
        """After the step's micro-batches: beta-DPO's M_0, as they moved it, into RunState (checkpoints carry it)."""
        if self.setup.beta_schedule is not None:
            self.setup.beta_schedule.keep(job.ctx.beta)

    def eval_record(self, step: int) -> dict:
        s = self.setup
        metrics = evaluate(self.job(StepContext(s.cfg, s.with_reference, group=s.accelerator)), s.data.eval)
        return {"step": step, **metrics, **self.generate_on_eval(), **self.retention_metrics()}

    def checkpoint(self) -> Path:
        s, state = self.setup, self.progress.state
        moved = s.accelerator.unwrap_model(s.reference) if state.ref_syncs > 0 else None  # TR-DPO
        return save_checkpoint(
            s.accelerator,
            s.run_dir,
            state,
            s.policy,
            s.optimizer,
            s.scheduler,
            self.progress.window,
            s.cfg.train.save_total_limit,
            reference=moved,
        )

    def result(self, metrics: dict, stop_reason: Optional[str]) -> TrainResult:
        run_dir = self.setup.run_dir
        if self.is_main:  # report.html in every run directory, also for dpokit.train(...) and the demo (issue 15.17)
            write_report(run_dir)
        return TrainResult(run_dir=run_dir, metrics=metrics, model_dir=run_dir / "final", stop_reason=stop_reason)


@dataclass
class StepOutcome:
    loss: float  # this process's mean loss over the step
    grad_norm: float  # before clipping; nan when the backend does not report it
    learning_rate: float  # the one the update used
    bad: bool  # a non-finite loss or gradient: the update was skipped
    overflow: bool  # ... by the fp16 loss scaler, which is its business, not a fault
    stop_requested: bool  # SIGTERM/SIGINT on some process
    completion_tokens: Optional[int]  # trained on, over all processes; counted while the empty-data guard watches only
