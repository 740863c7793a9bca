"""Stopping on a signal: SIGTERM/SIGINT end the run after the current step, with a checkpoint and the command that resumes it."""

from __future__ import annotations

import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Optional

from dpokit.config import Config


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT: a checkpoint was saved at the end of the current step; `resume_command` continues the run."""

    def __init__(self, message: str, checkpoint: Path, resume_command: str, signum: int):
        super().__init__(message)
        self.checkpoint, self.resume_command, self.signum = checkpoint, resume_command, signum


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step (and save); a second one acts as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])  # a second signal aborts at once
        print(
            f"\n[dpokit] {signal.Signals(signum).name} received: saving a checkpoint at the end of this step "
            "(send it again to abort without saving)",
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_command(cfg: Config, run_dir: Path, num_processes: int) -> str:
    args = [str((run_dir / "config.yaml").resolve()), "train.resume=auto"]
    if not Path(cfg.out_dir).is_absolute():
        args.append(f"out_dir={run_dir.resolve()}")
    quoted = " ".join(shlex.quote(a) for a in args)
    if num_processes == 1:
        return f"dpokit train {quoted}"
    # The same launcher as this run (its other options, e.g. for several machines, as they were).
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(num_processes))
    if (
        "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ
    ):  # set by accelerate launch
        return f"accelerate launch --num_processes {num_processes} -m dpokit.cli train {quoted}  (plus your other launcher options)"
    return f"torchrun --nproc_per_node {per_node} -m dpokit.cli train {quoted}  (plus your other launcher options)"
