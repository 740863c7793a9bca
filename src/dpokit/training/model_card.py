"""final/README.md: the model card of a run, in the Hub's format (YAML front matter, then markdown).

It says what the model is (its base, full weights or a LoRA adapter), what it was trained on (the
data summary's row counts), how (loss, beta, the settings that matter), how it ended (the final
TRL-named metrics, the eval results, the diagnoses that fired) and how to load it. Everything in it
comes from the config and the run's own records, so two identical runs write the same card but for
the date.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import huggingface_hub
import yaml

from dpokit.training.throughput import VOLATILE
from dpokit.version import __version__
from dpokit.config import Config
from dpokit.losses import LossConfig, loss_names

# A Hub repo id ("name" or "owner/name"); the Hub rejects a card whose base_model or datasets is anything else.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_FILE = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".txt", ".arrow")
# TRL's headline metrics first; the rest follow in name order.
_FIRST = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
_NOT_A_RESULT = {
    "train_runtime",
    *VOLATILE,
}  # wall time and the machine: two identical runs would write different cards


@dataclass
class RunFacts:
    """What the card reports that the config does not hold."""

    summary: dict = field(
        default_factory=dict
    )  # data_summary.json: per split rows_read / rows_used / rows_skipped / held_out / pairs
    metrics: dict = field(
        default_factory=dict
    )  # TrainResult.metrics: the last training record plus eval_* of the final evaluation
    diagnoses: list = field(default_factory=list)  # the detectors' Diagnosis objects that fired
    processes: int = 1
    steps: int = 0  # optimizer steps taken


def hub_id(name: Optional[str]) -> Optional[str]:
    """`name` as a Hub repo id, or None for a local path (a folder in the HF cache names its repo)."""
    if not name:
        return None
    local = Path(os.path.expanduser(name))
    if local.exists():
        # huggingface_hub's cache layout: .../models--owner--name/snapshots/<commit>
        if local.parent.name == "snapshots" and local.parent.parent.name.startswith("models--"):
            return local.parent.parent.name[len("models--") :].replace("--", "/")
        return None
    return name if _HUB_ID.match(name) and not name.lower().endswith(_DATA_FILE) else None


def render_card(cfg: Config, facts: RunFacts, model_dir: Path, date: Optional[datetime.date] = None) -> str:
    """The whole README.md; `model_dir` is where the model is saved (the load snippet names it)."""
    adapter = cfg.lora.enabled and cfg.lora.save == "adapter"
    sections = [
        "---\n" + yaml.safe_dump(front_matter(cfg, adapter), sort_keys=False) + "---",
        f"# {Path(cfg.out_dir).name or 'dpokit model'}",
        f"{_what_it_is(cfg, adapter)} Trained with dpokit {__version__} on {(date or datetime.date.today()).isoformat()}.",
        "## How to load it\n\n" + _load_snippet(cfg, adapter, model_dir),
        "## Data\n\n" + _data_section(cfg, facts.summary),
        "## Training\n\n" + _training_section(cfg, facts),
        "## Results\n\n" + _results_section(facts.metrics),
        "## Diagnoses\n\n" + _diagnoses_section(facts.diagnoses),
    ]
    return "\n\n".join(sections) + "\n"


def write_card(cfg: Config, facts: RunFacts, folder: Path, model_dir: Path) -> None:
    (Path(folder) / "README.md").write_text(render_card(cfg, facts, model_dir), encoding="utf-8")


def front_matter(cfg: Config, adapter: bool) -> dict:
    base = hub_id(cfg.model.name_or_path)
    meta: dict = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter else "transformers"
    license_ = _base_license(cfg)
    if license_:
        meta["license"] = license_
    datasets = [d for d in (hub_id(cfg.data.path), hub_id(cfg.data.eval_path)) if d]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    objective = "sft" if cfg.train.task == "sft" else "dpo"
    meta["tags"] = ["dpokit", "trl", objective] + (["lora"] if cfg.lora.enabled else [])
    return meta


def _base_license(cfg: Config) -> Optional[str]:
    """The base model's own card's license: from its folder, or from the local HF cache (never the network)."""
    local = Path(os.path.expanduser(cfg.model.name_or_path)) / "README.md"
    card = local if local.is_file() else None
    if card is None and hub_id(cfg.model.name_or_path):
        cached = huggingface_hub.try_to_load_from_cache(
            cfg.model.name_or_path, "README.md", revision=cfg.model.revision
        )
        card = Path(cached) if isinstance(cached, str) else None
    if card is None:
        return None
    try:
        meta = huggingface_hub.metadata_load(card) or {}
    except (OSError, ValueError, yaml.YAMLError):  # a base card we cannot read has no license we can repeat
        return None
    value = meta.get("license")
    return value if isinstance(value, str) else None


def _what_it_is(cfg: Config, adapter: bool) -> str:
    base = f"`{cfg.model.name_or_path}`"
    objective = "SFT" if cfg.train.task == "sft" else f"preference ({', '.join(loss_names(cfg.loss))})"
    if adapter:
        return f"A LoRA adapter for {base}, trained by {objective} optimisation."
    if cfg.lora.enabled:
        return f"{base} with a LoRA adapter, trained by {objective} optimisation, merged into its weights."
    return f"{base} fully fine-tuned by {objective} optimisation."


def _load_snippet(cfg: Config, adapter: bool, model_dir: Path) -> str:
    path = os.path.abspath(model_dir)
    remote = ", trust_remote_code=True" if cfg.model.trust_remote_code else ""
    if adapter:
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({path!r}{remote})  # base + adapter\n"
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})"
        )
        note = (
            f"\n\nThe base is read from `adapter_config.json` (`{cfg.model.name_or_path}`). With the base already loaded: "
            f"`PeftModel.from_pretrained(base_model, {path!r})`; `model.merge_and_unload()` gives a plain transformers model."
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({path!r}{remote})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})"
        )
        note = ""
    if cfg.train.push_to_hub:
        note += f"\n\nFrom the Hub: the same calls with `{cfg.train.push_to_hub!r}` in place of the folder."
    return f"```python\n{code}\n```{note}"


def _data_section(cfg: Config, summary: dict) -> str:
    lines = [f"- train: {_source(cfg.data.path, cfg.data.split)}"]
    if cfg.data.eval_path:
        lines.append(f"- eval: {_source(cfg.data.eval_path, cfg.data.eval_split)}")
    elif cfg.data.eval_fraction > 0:
        lines.append(f"- eval: {cfg.data.eval_fraction:g} of the training prompts, held out (seed {cfg.train.seed})")
    if not summary:
        return "\n".join(lines)
    unit = "examples" if "labels" in summary.get("train", {}) else "pairs"  # KTO's summary counts labelled completions
    lines += ["", f"| split | rows read | rows used | rows skipped | held out | {unit} |", "|---|---|---|---|---|---|"]
    for split, s in summary.items():
        lines.append(
            f"| {split} | {s.get('rows_read', 0)} | {s.get('rows_used', 0)} | {s.get('rows_skipped', 0)} | "
            f"{s.get('held_out', 0)} | {s.get('pairs', 0)} |"
        )
    for split, s in summary.items():
        for reason, n in s.get("skipped_by_reason", {}).items():
            lines.append(f"\n{split}: {n} rows skipped: {reason}")
    return "\n".join(lines)


def _source(path: str, split: str) -> str:
    # A single file is read whole; the split names a part of a dataset (a folder or a Hub id).
    return f"`{path}`" if Path(os.path.expanduser(path)).is_file() else f"`{path}` (split `{split}`)"


def _training_section(cfg: Config, facts: RunFacts) -> str:
    t, lora = cfg.train, cfg.lora
    steps = f"{facts.steps}" + (
        f" (train.max_steps={t.max_steps})" if t.max_steps > 0 else f" (train.epochs={t.epochs:g})"
    )
    if lora.enabled:
        targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
        method = f"LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout:g}, target modules {targets}, saved as {lora.save}"
    else:
        method = "full fine-tuning"
    if cfg.model.quantization != "none":
        method += f", {cfg.model.quantization} base (QLoRA)"
    rows = [
        ("task", t.task),
        ("loss", " + ".join(loss_names(cfg.loss))),
        ("beta", f"{cfg.loss.beta:g}"),
        *_loss_settings_on(cfg.loss),
        ("method", method),
        ("learning rate", f"{cfg.optim.lr:g} ({cfg.optim.scheduler}, optimizer {cfg.optim.name})"),
        (
            "batch",
            f"{t.batch_size} x {t.grad_accum} accumulation x {facts.processes} processes = "
            f"{t.batch_size * t.grad_accum * facts.processes} per step",
        ),
        ("optimizer steps", steps),
        ("epochs", f"{facts.metrics['epoch']:g}" if "epoch" in facts.metrics else "-"),
        ("max length", f"{cfg.data.max_length} tokens (prompt {cfg.data.max_prompt_length})"),
        ("dtype", cfg.model.dtype + (f", mixed precision {t.mixed_precision}" if t.mixed_precision != "no" else "")),
        ("seed", str(t.seed)),
    ]
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _loss_settings_on(loss: LossConfig) -> list[tuple[str, str]]:
    """The loss.* settings changed from their defaults (type and beta are shown anyway)."""
    default = LossConfig()
    changed = [
        f
        for f in fields(LossConfig)
        if f.name not in ("type", "beta") and getattr(loss, f.name) != getattr(default, f.name)
    ]
    return [(f"loss.{f.name}", str(getattr(loss, f.name))) for f in changed]


def _results_section(metrics: dict) -> str:
    numbers = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_A_RESULT
    }
    train = {k: v for k, v in numbers.items() if not k.startswith("eval_")}
    evals = {k: v for k, v in numbers.items() if k.startswith("eval_")}
    parts = []
    for title, table, prefix in (("Final training metrics", train, ""), ("Eval results", evals, "eval_")):
        if table:
            parts.append(
                f"{title} (TRL names; the last records of `metrics.jsonl`):\n\n| metric | value |\n|---|---|\n"
                + "\n".join(f"| {k} | {_number(table[k])} |" for k in _ordered(table, prefix))
            )
    return "\n\n".join(parts) if parts else "No metrics were logged."


def _ordered(table: dict, prefix: str) -> list[str]:
    first = [prefix + k for k in _FIRST if prefix + k in table]
    return first + sorted(k for k in table if k not in first)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) or not math.isfinite(value) else f"{value:.6g}"


def _diagnoses_section(diagnoses: list) -> str:
    if not diagnoses:
        return "None of dpokit's failure detectors fired."
    return "\n".join(
        f"- {d.severity}: **{d.mode}** at step {d.step}: {d.evidence}. What to do: {d.mitigation}" for d in diagnoses
    )
