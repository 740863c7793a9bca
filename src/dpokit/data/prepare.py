"""config.data -> tokenised train and eval pairs, plus the data summary printed at start.

load (layouts.load_preferences) -> hold out eval prompts -> tokenise and truncate ->
refuse degenerate tokenization (token_health) -> summary of rows read, used, skipped
by reason, prompts per split, truncation counts, token length percentiles and the
tokenizer class. Nothing is dropped without being counted in the summary.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from dpokit.config import Config
from dpokit.data.layouts import load_preference_groups
from dpokit.data.records import DataError, SkipReport
from dpokit.data.rows import cap_rows
from dpokit.data.token_health import check_token_health, paired_rows
from dpokit.data.tokenization import TokenizationStats, TokenizedPair, empty_render_problem, tokenize_pairs


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    summary: dict
    # the SFT files beside the training data, by summary section ("sft_mix", "retention"): tokenised examples,
    # prepared once with the training data so their skip reports reach the console and data_summary.json too
    side: dict[str, list] = field(default_factory=dict)


def _load(path: str, split: str, cfg: Config):
    """The pairs of each row, one group per row: an every_turn conversation's pairs stay together through
    data.max_rows and the eval split (its later prompts hold its earlier turns)."""
    groups, report = load_preference_groups(
        path,
        split=split,
        columns=cfg.data.columns or None,
        layout=cfg.data.layout,
        strict=cfg.data.strict,
        max_rows=cfg.data.max_rows,
    )
    return cap_rows(groups, report, path, cfg.data.max_rows), report


def prompt_key(item) -> str:
    """A comparable form of an item's prompt; `item` is an example or a group of examples of one row."""
    first = item[0] if isinstance(item, list) else item
    prompt = first.prompt
    key = " ".join(prompt.split()) if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    images = getattr(
        first, "images", None
    )  # image rows (data/vision.py): the same question about another image is another prompt
    return key + "|" + hashlib.blake2b(b"".join(images), digest_size=16).hexdigest() if images else key


def split_by_prompt(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): whole prompts held out at random (seeded) until `fraction` of the items are.

    Splitting rows instead would put a prompt with several pairs on both sides, and the eval
    would score prompts the model trained on. At least one prompt stays in training; data with
    a single prompt cannot be split this way and raises DataError.
    """
    rows_of: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        rows_of.setdefault(prompt_key(item), []).append(i)
    if len(rows_of) < 2:
        raise DataError(
            f"data.eval_fraction={fraction} holds out whole prompts, and all {len(items)} rows share "
            "one prompt; give a separate data.eval_path or set data.eval_fraction=0"
        )
    prompts = list(rows_of)
    random.Random(seed).shuffle(prompts)
    target, held = max(1, int(len(items) * fraction)), set()
    for prompt in prompts[:-1]:
        if len(held) >= target:
            break
        held.update(rows_of[prompt])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_train_and_eval(cfg: Config, load) -> tuple[list, SkipReport, list, SkipReport]:
    """Training rows and held-out rows, each with its SkipReport: `load(path, split, cfg)` reads one source.

    The eval rows come from data.eval_path, else whole prompts holding a seeded data.eval_fraction
    of the training rows (the same rows in every run with the same seed; `split_by_prompt`),
    counted as held out, never as dropped. Each report counts its split's distinct prompts.
    Shared by the paired, unpaired (KTO) and SFT preparations, whose `load` differ.
    """
    train, train_report = load(cfg.data.path, cfg.data.split, cfg)
    if cfg.data.eval_path:
        evals, eval_report = load(cfg.data.eval_path, cfg.data.eval_split, cfg)
    elif cfg.data.eval_fraction > 0:
        train, evals = split_by_prompt(train, cfg.data.eval_fraction, cfg.train.seed)
        eval_report = SkipReport()
        train_report.rows_used -= len(evals)
        train_report.held_out = eval_report.rows_read = eval_report.rows_used = len(evals)
    else:
        evals, eval_report = [], SkipReport()
    train_report.prompts = len({prompt_key(x) for x in train})
    eval_report.prompts = len({prompt_key(x) for x in evals})
    return train, train_report, evals, eval_report


def prepare_data(cfg: Config, tokenizer) -> PreparedData:
    train_groups, train_report, eval_groups, eval_report = load_train_and_eval(cfg, _load)
    train_examples = [example for group in train_groups for example in group]
    eval_examples = [example for group in eval_groups for example in group]
    train_report.count_turns(train_groups)  # after the eval split, which moves whole conversations
    eval_report.count_turns(eval_groups)
    train, train_stats = tokenize_pairs(
        train_examples, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, train_report
    )
    health = check_token_health(
        paired_rows(train_examples, train), tokenizer, cfg.data.path, cfg.data.max_unknown_token_rate
    )
    evals, eval_stats = tokenize_pairs(
        eval_examples, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, eval_report
    )
    for examples, report in ((train_examples, train_report), (eval_examples, eval_report)):
        refuse_empty_renders(report, len(examples), cfg)
    summary = {
        "train": split_summary(train_report, train_stats, len(train)),
        "eval": split_summary(eval_report, eval_stats, len(evals)),
    }
    summary["train"]["token_health"] = health
    return PreparedData(train, evals, summary)


def refuse_empty_renders(
    report: SkipReport, examples: int, cfg: Config, path: str | None = None, unit: str = "pairs"
) -> None:
    """DataError past data.max_empty_render_fraction of completions rendered as nothing (tokenization.py)."""
    problem = empty_render_problem(report, examples, cfg.data.max_empty_render_fraction, path or cfg.data.path, unit)
    if problem:
        raise DataError(problem)


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
            f"[data] {split}: {s['rows_read']} rows read, {s['pairs']} {s.get('unit', 'pairs')} used"
            + (f" ({s['prompts']} prompts)" if s.get("prompts") else "")
            + f", {s['rows_skipped']} dropped"
            + (f", {s['held_out']} held out for eval" if s.get("held_out") else "")
            + (f"  (layouts: {layouts})" if layouts else "")
        )
        turns = s.get("every_turn") or {}
        if turns.get("conversations"):
            lines.append(
                f"[data]   every turn: {turns['conversations']} conversations -> {turns['pairs']} pairs "
                "(one per judged assistant turn)"
            )
        if s.get("token_health"):
            lines.append(
                f"[data]   tokenizer: {s['token_health']['tokenizer_class']} "
                f"({s['token_health']['unknown_token_rate']:.1%} unknown tokens in a sample of "
                f"{s['token_health']['rows']} rows)"
            )
        for reason, n in s["skipped_by_reason"].items():
            examples = "; ".join(s["skipped_examples"].get(reason, [])[:3])
            lines.append(f"[data]   dropped {n}: {reason}  e.g. {examples}")
        t = s["truncated"]
        if any(t.values()):
            lines.append(
                f"[data]   truncated: {t['prompt']} prompts (left), {t['chosen']} chosen, {t['rejected']} rejected (right)"
            )
        for name, p in s["token_lengths"].items():
            lines.append(
                f"[data]   {name:8s} tokens: min {p['min']}  p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}"
            )
    return "\n".join(lines)
