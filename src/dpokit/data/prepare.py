"""config.data -> tokenised train and eval pairs, plus the data summary printed at start.

load (layouts.load_preferences) -> hold out eval rows -> tokenise and truncate ->
summary of rows read, used, skipped by reason, truncation counts and token
length percentiles. Nothing is dropped without being counted in the summary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dpokit.config import Config
from dpokit.data.layouts import load_preferences
from dpokit.data.records import SkipReport
from dpokit.data.rows import cap_rows
from dpokit.data.tokenization import TokenizationStats, TokenizedPair, tokenize_pairs


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    summary: dict


def _load(path: str, split: str, cfg: Config):
    examples, report = load_preferences(
        path, split=split, columns=cfg.data.columns or None, layout=cfg.data.layout, strict=cfg.data.strict
    )
    return cap_rows(examples, report, path, cfg.data.max_rows), report


def load_train_and_eval(cfg: Config, load) -> tuple[list, SkipReport, list, SkipReport]:
    """Training rows and held-out rows, each with its SkipReport: `load(path, split, cfg)` reads one source.

    The eval rows come from data.eval_path, else a seeded data.eval_fraction of the training rows
    (the same rows in every run with the same seed), counted as held out, never as dropped.
    Shared by the paired, unpaired (KTO) and SFT preparations, whose `load` differ.
    """
    train, train_report = load(cfg.data.path, cfg.data.split, cfg)
    if cfg.data.eval_path:
        evals, eval_report = load(cfg.data.eval_path, cfg.data.eval_split, cfg)
        return train, train_report, evals, eval_report
    eval_report = SkipReport()
    if cfg.data.eval_fraction <= 0:
        return train, train_report, [], eval_report
    order = list(range(len(train)))
    random.Random(cfg.train.seed).shuffle(order)
    n_eval = max(1, int(len(order) * cfg.data.eval_fraction))
    held = set(order[:n_eval])
    evals = [item for i, item in enumerate(train) if i in held]
    train = [item for i, item in enumerate(train) if i not in held]
    train_report.rows_used -= n_eval
    train_report.held_out = eval_report.rows_read = eval_report.rows_used = n_eval
    return train, train_report, evals, eval_report


def prepare_data(cfg: Config, tokenizer) -> PreparedData:
    train_examples, train_report, eval_examples, eval_report = load_train_and_eval(cfg, _load)
    train, train_stats = tokenize_pairs(
        train_examples, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, train_report
    )
    evals, eval_stats = tokenize_pairs(
        eval_examples, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, eval_report
    )
    summary = {"train": split_summary(train_report, train_stats, len(train)), "eval": split_summary(eval_report, eval_stats, len(evals))}
    return PreparedData(train, evals, summary)


def split_summary(report: SkipReport, stats: TokenizationStats, n_pairs: int) -> dict:
    out = report.to_dict()
    out["pairs"] = n_pairs
    out["truncated"] = {
        "prompt": stats.prompts_truncated,
        "chosen": stats.chosen_truncated,
        "rejected": stats.rejected_truncated,
    }
    out["token_lengths"] = stats.percentiles()
    return out


def format_summary(summary: dict) -> str:
    """Human-readable data summary for the console."""
    lines = []
    for split, s in summary.items():
        if not s.get("rows_read"):
            continue
        layouts = ", ".join(f"{k}: {v}" for k, v in s["layouts"].items())
        lines.append(
            f"[data] {split}: {s['rows_read']} rows read, {s['pairs']} pairs used, "
            f"{s['rows_skipped']} dropped" + (f", {s['held_out']} held out for eval" if s.get("held_out") else "")
            + f"  (layouts: {layouts})"
        )
        for reason, n in s["skipped_by_reason"].items():
            examples = "; ".join(s["skipped_examples"].get(reason, [])[:3])
            lines.append(f"[data]   dropped {n}: {reason}  e.g. {examples}")
        t = s["truncated"]
        if any(t.values()):
            lines.append(f"[data]   truncated: {t['prompt']} prompts (left), {t['chosen']} chosen, {t['rejected']} rejected (right)")
        for name, p in s["token_lengths"].items():
            lines.append(
                f"[data]   {name:8s} tokens: min {p['min']}  p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}"
            )
    return "\n".join(lines)
