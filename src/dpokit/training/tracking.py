"""Experiment tracking (TensorBoard, Weights & Biases, MLflow) through Accelerate's own trackers.

`train.report_to: [tensorboard, wandb, mlflow]` (default []) sends every logged
metrics record to the named trackers as well as to metrics.jsonl. Accelerate
already implements each client and runs it on the main process only, so dpokit
adds no tracker code, only what Accelerate leaves out:

- a clear error when a tracker is requested but its package is missing
  (Accelerate drops an unavailable tracker with a debug-level log line, and the
  user would find out after the run that nothing was tracked);
- a flat, scalar-only config without secrets for the run's hyperparameters
  (TensorBoard's hparams accept only scalars; MLflow params only short strings);
- numeric values only, with `step` as the x axis rather than a metric;
- finishing the trackers without destroying the process group
  (`Accelerator.end_training` does both; `train()` may run again in the same process).

The trainer calls, in order:

    accelerator = Accelerator(mixed_precision=..., cpu=..., **accelerator_kwargs(cfg))
    init_trackers(accelerator, cfg)                   # after run_dir exists
    log_metrics(accelerator, record, record["step"])  # every record written to metrics.jsonl
    log_diagnosis(accelerator, diagnosis)             # every diagnosis (text, where the tracker takes text)
    end_trackers(accelerator)                         # after the final eval
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from accelerate.utils import ProjectConfiguration, is_mlflow_available, is_tensorboard_available, is_wandb_available

from dpokit.config import ConfigError

PROJECT_NAME = "dpokit"  # the W&B project and the MLflow experiment (MLFLOW_EXPERIMENT_NAME overrides it)
TRACKERS = ("tensorboard", "wandb", "mlflow")
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb", "mlflow": "pip install mlflow"}
TEXT_TRACKERS = ("tensorboard", "wandb")  # trackers whose log() records strings (MLflow drops them with a warning)
# A key named like a credential (token, hf_token, api_key, password, ...); max_new_tokens and the like do not match.
SECRET = re.compile(r"^(.*[_.-])?(token|secret|password|passwd|api_?key|credentials?)$", re.IGNORECASE)


def _available(name: str) -> bool:
    # Accelerate's own availability checks, so "installed" here means what Accelerate will accept.
    checks = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    return bool(checks[name]())  # Accelerate returns None, not False, for some missing packages


def requested_trackers(cfg) -> list[str]:
    """`train.report_to`, checked: known names, installed packages, no repeats (order kept)."""
    names = list(getattr(cfg.train, "report_to", None) or [])
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"config key 'train.report_to': unknown tracker(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(TRACKERS)}"
        )
    missing = [n for n in names if not _available(n)]
    if missing:
        how = "; ".join(INSTALL[n] for n in missing)
        raise ConfigError(
            f"train.report_to asks for {', '.join(missing)} but it is not installed ({how}), "
            "or remove it from train.report_to"
        )
    return list(dict.fromkeys(names))


def tensorboard_dir(cfg) -> Path:
    """Where TensorBoard event files go: RUN_DIR/tensorboard/dpokit/ (point `tensorboard --logdir` at RUN_DIR/tensorboard)."""
    return Path(cfg.out_dir) / "tensorboard"


def accelerator_kwargs(cfg) -> dict[str, Any]:
    """Keyword arguments for `Accelerator(...)`: {} without trackers, else log_with and a project configuration.

    The logging directory is RUN_DIR/tensorboard, so TensorBoard files stay inside the run directory
    next to metrics.jsonl instead of in the current directory.
    """
    names = requested_trackers(cfg)
    if not names:
        return {}
    config = ProjectConfiguration(project_dir=str(cfg.out_dir), logging_dir=str(tensorboard_dir(cfg)))
    return {"log_with": names, "project_config": config}


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (list, tuple, dict)):
        return json.dumps(value)  # hparams and params take scalars: a list is kept readable as its JSON text
    return value


def flat_config(cfg) -> dict[str, Any]:
    """The resolved config as {"section.key": scalar}, without any key that looks like a secret."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if SECRET.search(str(key)):
                continue
            if isinstance(value, dict) and value:
                walk(value, f"{name}.")
            else:
                flat[name] = _scalar(value)

    walk(cfg.to_dict(), "")
    return flat


def init_trackers(accelerator, cfg) -> None:
    """Start the trackers named in `train.report_to` (main process; a no-op without trackers).

    W&B's local files go to RUN_DIR (not the current directory); the W&B run and the MLflow run
    are named after RUN_DIR. MLflow's destination is MLflow's own setting (MLFLOW_TRACKING_URI).
    """
    if not requested_trackers(cfg):
        return
    run_name = Path(cfg.out_dir).name or PROJECT_NAME
    init_kwargs = {"wandb": {"name": run_name, "dir": str(cfg.out_dir)}, "mlflow": {"run_name": run_name}}
    accelerator.init_trackers(PROJECT_NAME, config=flat_config(cfg), init_kwargs=init_kwargs)


def numeric_metrics(record: dict) -> dict[str, float]:
    """The record's numbers as floats, without `step` (the x axis) and without None (NaN in metrics.jsonl)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


def log_metrics(accelerator, record: dict, step: int) -> dict[str, float]:
    """Send one metrics record to every tracker at `step`; returns what was sent (empty without trackers)."""
    if not accelerator.trackers:
        return {}
    values = numeric_metrics(record)
    if values:
        accelerator.log(values, step=int(step))
    return values


def log_diagnosis(accelerator, diagnosis) -> None:
    """A diagnosis as text under `diagnosis/<mode>` at its step, for the trackers that record text."""
    for tracker in accelerator.trackers:
        if tracker.name in TEXT_TRACKERS:
            tracker.log({f"diagnosis/{diagnosis.mode}": str(diagnosis)}, step=int(diagnosis.step))


def end_trackers(accelerator) -> None:
    """Flush and close every tracker; unlike `Accelerator.end_training`, the process group is left alone."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
