"""Read a run directory into what the report shows, tolerating whatever is missing.

A report is most wanted when a run went wrong: it was interrupted mid-write, it
had no eval data, it was a KTO run without margins, or it was copied without
its config. So nothing here raises on a missing file, key or line: every gap
becomes a note that the report prints, and the rest is shown.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dpokit.config import ConfigError
from dpokit.config.loading import load_yaml_text
from dpokit.detectors import replay
from dpokit.inputs import InputError, loads_bounded, read_bytes

Verdict = Literal["healthy", "warnings", "stopped", "no metrics"]


@dataclass
class RunData:
    run_dir: Path
    train: list[dict] = field(default_factory=list)  # training records, in file order
    eval: list[dict] = field(default_factory=list)  # records with eval_* keys
    diagnoses: list[dict] = field(default_factory=list)  # Diagnosis fields: mode, step, evidence, mitigation, severity
    skipped: list[dict] = field(
        default_factory=list
    )  # optimizer updates skipped on a NaN/Inf: step, reason, loss, grad_norm
    diagnoses_source: str = "recorded"  # "recorded" in metrics.jsonl, or "replayed" from the metrics
    config: dict = field(default_factory=dict)
    config_text: Optional[str] = None
    data_summary: Optional[dict] = None
    notes: list[str] = field(default_factory=list)  # what is missing or odd, in words

    @property
    def verdict(self) -> Verdict:
        """stopped (a stop diagnosis fired), warnings (any other, or a skipped update), healthy, no metrics (nothing logged)."""
        if not self.train and not self.eval:
            return "no metrics"
        if any(d.get("severity") == "stop" for d in self.diagnoses):
            return "stopped"
        # A skipped update is no diagnosis, but a NaN/Inf in the run is worth a look all the same.
        return "warnings" if self.diagnoses or self.skipped else "healthy"

    @property
    def last_step(self) -> Optional[int]:
        steps = [r["step"] for r in self.train + self.eval if isinstance(r.get("step"), (int, float))]
        return int(max(steps)) if steps else None

    @property
    def planned_steps(self) -> Optional[int]:
        max_steps = self.setting("train", "max_steps")
        return max_steps if isinstance(max_steps, int) and max_steps > 0 else None

    def setting(self, section: str, key: str) -> Any:
        """A value of the resolved config, or None when the config or the key is absent."""
        block = self.config.get(section)
        return block.get(key) if isinstance(block, dict) else None

    def keys(self) -> set[str]:
        return {k for r in self.train + self.eval for k in r}


def number(value: Any) -> Optional[float]:
    """A finite float, or None for a missing value, null (NaN in metrics.jsonl), NaN/Inf, or a non-number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def run_file_text(path: Path, notes: list[str]) -> str:
    """A run-directory file's text through the input gateway (a regular file, at most its kind's limit);
    what cannot be read becomes a note on the page, not a traceback (a RUN_DIR is named by the user)."""
    try:
        return read_bytes(path, "run").decode("utf-8", errors="replace")
    except InputError as error:
        notes.append(f"{path.name}: {error.reason}")
        return ""


def read_records(path: Path, notes: list[str]) -> list[dict]:
    """metrics.jsonl's objects; a line that is not a JSON object (an interrupted write) is skipped with a note."""
    records, bad = [], []
    for n, line in enumerate(run_file_text(path, notes).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = loads_bounded(line)
        except ValueError:  # not JSON, nested absurdly deep, a number of thousands of digits: a damaged line
            bad.append(n)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(n)
    if bad:
        where = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        notes.append(
            f"metrics.jsonl: skipped {len(bad)} line(s) that are not JSON objects (line {where}); "
            "a run interrupted while writing leaves a cut last line"
        )
    return records


def _step(record: dict) -> Optional[float]:
    return number(record.get("step"))


def _before(items: list[dict], step: float) -> list[dict]:
    return [item for item in items if (_step(item) or 0) < step]


def _split(records: list[dict], notes: list[str]) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Train records, eval records, diagnoses and skipped updates, in file order.

    A resumed run goes on logging from its checkpoint's step into the same file: when the training
    step goes backwards, the earlier records from that step on belong to the abandoned attempt and
    are dropped, so each curve is the history of the weights that were kept.
    """
    train: list[dict] = []
    evals: list[dict] = []
    diagnoses: list[dict] = []
    skipped: list[dict] = []
    for record in records:
        step = _step(record)
        if isinstance(record.get("diagnosis"), dict):
            diagnoses.append(record["diagnosis"])
        elif isinstance(record.get("skipped_step"), dict):
            skipped.append({"step": record.get("step"), **record["skipped_step"]})
        elif any(k.startswith("eval_") for k in record):
            evals.append(record)
        else:
            last = _step(train[-1]) if train else None
            # Strictly backwards: two records may share a step (the record that stops a run on a NaN).
            if step is not None and last is not None and step < last:
                notes.append(
                    f"the run was resumed at step {step:g}: records from step {step:g} on that were "
                    "logged before the resume are left out"
                )
                train, evals, diagnoses, skipped = (_before(x, step) for x in (train, evals, diagnoses, skipped))
            train.append(record)
    return train, evals, diagnoses, skipped


def _load_config(run_dir: Path, run: RunData) -> None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        run.notes.append("no config.yaml in the run directory: the config section is empty")
        return
    run.config_text = run_file_text(path, run.notes)
    try:
        loaded = load_yaml_text(run.config_text, str(path))  # the config loader's alias limit: a RUN_DIR is untrusted
    except ConfigError as e:
        run.notes.append(f"config.yaml is not shown: {e}")
        return
    except yaml.YAMLError as e:
        run.notes.append(f"config.yaml is not valid YAML ({e.__class__.__name__}); shown as text")
        return
    run.config = loaded if isinstance(loaded, dict) else {}


def _load_summary(run_dir: Path, run: RunData) -> None:
    path = run_dir / "data_summary.json"
    if not path.is_file():
        run.notes.append("no data_summary.json in the run directory: the data section is empty")
        return
    try:
        summary = loads_bounded(run_file_text(path, run.notes) or "null")
    except ValueError:
        run.notes.append("data_summary.json is not valid JSON: the data section is empty")
        return
    run.data_summary = summary if isinstance(summary, dict) else None


def load_run(run_dir: str | Path) -> RunData:
    """Everything the report needs from a run directory; raises only if the directory does not exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    run = RunData(run_dir=run_dir)
    _load_config(run_dir, run)
    _load_summary(run_dir, run)
    metrics = run_dir / "metrics.jsonl"
    records = read_records(metrics, run.notes) if metrics.is_file() else []
    if not metrics.is_file():
        run.notes.append("no metrics.jsonl in the run directory: the run has not logged a step yet")
    run.train, run.eval, run.diagnoses, run.skipped = _split(records, run.notes)
    if not run.diagnoses and (run.train or run.eval):
        # Runs from before the detectors were wired into the loop (or logged elsewhere) carry no
        # diagnosis records; replaying the detectors over the metrics gives the same verdict afterwards.
        kept = {id(r) for r in run.train + run.eval}  # in file order, without a resumed run's abandoned records
        run.diagnoses = [asdict(d) for d in replay(r for r in records if id(r) in kept)]
        run.diagnoses_source = "replayed"
    _note_gaps(run)
    return run


def _note_gaps(run: RunData) -> None:
    if (run.train or run.eval) and not run.eval:
        run.notes.append(
            "no eval records: the run had no eval data (data.eval_path or data.eval_fraction)"
            " or ended before its first evaluation; only training curves are shown"
        )
    last, planned = run.last_step, run.planned_steps
    stopped = run.verdict == "stopped"
    if last is not None and planned is not None and last < planned and not stopped:
        run.notes.append(
            f"the last record is at step {last} of {planned} planned (train.max_steps): "
            "the run was interrupted or is still running"
        )
    if (run.train or run.eval) and not (run.run_dir / "final").exists() and not stopped:
        run.notes.append("no final/ model in the run directory: the run was interrupted, is still running, or failed")
