"""SFT rows -> examples (prompt, completion) and tokenised train/eval splits with the usual data summary.

Row layouts (detected per file, or forced with `data.layout`):

    prompt + completion      text, or conversational (prompt messages + assistant completion
                             messages); a `label` column is allowed: rows labelled false
                             (undesirable) are skipped and counted, never imitated
    messages                 a whole conversation; the last message, an assistant turn, is the
                             completion and everything before it the prompt
    any paired layout        prompt/chosen/rejected, hh-rlhf, ShareGPT, OpenAI, ...: the chosen
                             side (SFT on chosen = the DPO paper's "Preferred-FT" baseline)

Tokenisation and truncation are the paired data's (`tokenization.render_ids`: prompt +
completion + EOS, or the chat template; prompt cut from the left, completion from the right).
"""

from __future__ import annotations

from dpokit.config import Config
from dpokit.data.layouts import LAYOUTS, load_preference_groups, row_tools
from dpokit.data.loading import read_rows
from dpokit.data.prepare import PreparedData, load_train_and_eval, refuse_empty_renders, split_summary
from dpokit.data.records import DataError, SkipReport
from dpokit.data.rows import RowSkip, cap_rows, convert_rows, no_usable_rows_message
from dpokit.data.token_health import check_completion_health
from dpokit.data.unpaired import (
    UnpairedExample,
    detect_unpaired_layout,
    from_messages,
    from_prompt_completion,
    parse_label,
    rename_columns,
    tokenize_groups,
)

SFT_LAYOUTS = ("prompt_completion", "messages")
# data.layout values that name the unpaired layouts (the KTO names are accepted too).
_LAYOUT_ALIASES = {
    "prompt_completion": "prompt_completion",
    "prompt_completion_label": "prompt_completion",
    "messages": "messages",
    "messages_label": "messages",
}
_CONVERTERS = {"prompt_completion": from_prompt_completion, "messages": from_messages}
SFT_COLUMNS = ("prompt", "completion", "messages", "label")  # those of unpaired data: `rename_columns` maps them


def _is_paired_file(path: str, split: str, columns: dict[str, str], layout: str) -> bool:
    if layout in LAYOUTS or {"chosen", "rejected"} & set(columns):
        return True
    if layout in _LAYOUT_ALIASES or {"completion", "messages"} & set(columns):
        return False
    if layout != "auto":
        expected = ", ".join(("auto",) + SFT_LAYOUTS + LAYOUTS)
        raise DataError(f"unknown layout {layout!r} for SFT data; expected one of {expected}", path)
    for _, row in read_rows(path, split):
        row = rename_columns(row, columns)
        return "chosen" in row or "rejected" in row or detect_unpaired_layout(row) is None
    return False


def load_sft(
    path: str, split: str = "train", columns: dict[str, str] | None = None, layout: str = "auto", strict: bool = False
) -> tuple[list[UnpairedExample], SkipReport]:
    """Read every row of `path` as one SFT example (prompt, completion); bad rows skipped and counted."""
    groups, report = load_sft_groups(path, split, columns, layout, strict)
    return [example for group in groups for example in group], report


def load_sft_groups(
    path: str,
    split: str = "train",
    columns: dict[str, str] | None = None,
    layout: str = "auto",
    strict: bool = False,
    max_rows: int | None = None,
) -> tuple[list[list[UnpairedExample]], SkipReport]:
    """`load_sft`'s examples, one group per row: an every_turn row gives one example per judged turn."""
    columns = dict(columns or {})
    if _is_paired_file(path, split, columns, layout):
        rows, report = load_preference_groups(path, split, columns or None, layout, strict, max_rows)
        report.layouts = type(report.layouts)({f"{name} (chosen side)": n for name, n in report.layouts.items()})
        return [
            [UnpairedExample(p.prompt, p.chosen, True, p.source, p.tools, p.turn) for p in row] for row in rows
        ], report
    unknown = set(columns) - set(SFT_COLUMNS)
    if unknown:
        raise DataError(f"columns for SFT data map {', '.join(SFT_COLUMNS)} to column names; got {columns!r}", path)

    def convert(row: dict, where: str) -> tuple[str, list[UnpairedExample]]:
        row = rename_columns(row, columns)
        if layout in _LAYOUT_ALIASES:
            row_layout = _LAYOUT_ALIASES[layout]
        else:
            detected = detect_unpaired_layout(row)
            if detected is None:
                found = ", ".join(sorted(map(str, row))) or "none"
                raise RowSkip(f"unrecognised SFT layout (columns: {found}; expected prompt+completion or messages)")
            row_layout = _LAYOUT_ALIASES[detected]
        prompt, completion = _CONVERTERS[row_layout](row)
        if "label" in row and row["label"] is not None and not parse_label(row["label"]):
            raise RowSkip("label is false: an undesirable completion is not imitated", "label")
        return row_layout, [UnpairedExample(prompt, completion, True, where, row_tools(row, completion))]

    groups, report = convert_rows(path, split, convert, strict, max_rows)
    if not groups:
        raise DataError(no_usable_rows_message(report), path)
    return groups, report


def _load(path: str, split: str, cfg: Config):
    groups, report = load_sft_groups(
        path, split, cfg.data.columns or None, cfg.data.layout, cfg.data.strict, cfg.data.max_rows
    )
    return cap_rows(groups, report, path, cfg.data.max_rows), report


def prepare_sft(cfg: Config, tokenizer):
    """config.data -> PreparedData of TokenizedCompletion (train, eval) with the usual data summary.

    The eval split (data.eval_path, else a seeded data.eval_fraction of the rows) is that of
    `prepare_data`; the summary's token lengths name the completion `completion`.
    """
    train_groups, train_report, eval_groups, eval_report = load_train_and_eval(cfg, _load)
    train_report.count_turns(train_groups)  # every_turn rows, after the eval split
    eval_report.count_turns(eval_groups)
    summary, splits = {}, []
    for name, groups, report in (("train", train_groups, train_report), ("eval", eval_groups, eval_report)):
        tokenized, stats = tokenize_groups(groups, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, report)
        refuse_empty_renders(report, sum(map(len, groups)), cfg, unit="examples")
        stats.lengths = {"prompt": stats.lengths["prompt"], "completion": stats.lengths["chosen"]}
        summary[name] = split_summary(report, stats, len(tokenized))  # "pairs" here counts examples
        splits.append(tokenized)
    summary["train"]["token_health"] = check_completion_health(
        train_groups, splits[0], tokenizer, cfg.data.path, cfg.data.max_unknown_token_rate
    )
    return PreparedData(splits[0], splits[1], summary)


def prepare_sft_file(path: str, key: str, cfg: Config, tokenizer) -> tuple[list, dict]:
    """Every row of an SFT file that is not the run's training data (data.retention_path, data.sft_mix_path)
    -> (TokenizedCompletion list, its data summary section): the layouts, skips and truncation of `dpokit sft` data.

    The layout is detected per file (data.layout and data.columns describe data.path, not this file);
    data.max_length and data.max_prompt_length apply as to the training rows. `key` names the setting in errors.
    The section has the training split's keys (rows read, used, skipped by reason, ...) plus `path` and `setting`.
    """
    try:
        examples, report = load_sft(path, "train")
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
    tokenized, stats = tokenize_groups(
        [[e] for e in examples], tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, report
    )
    if not tokenized:
        raise DataError(
            f"{key}: no example of {path} has a completion token left after tokenisation ({no_usable_rows_message(report)})"
        )
    refuse_empty_renders(report, len(examples), cfg, f"{key}={path}", unit="examples")
    stats.lengths = {"prompt": stats.lengths["prompt"], "completion": stats.lengths["chosen"]}
    section = {"path": path, "setting": key, "unit": "examples", **split_summary(report, stats, len(tokenized))}
    return tokenized, section


SIDE_FILES = {"sft_mix": "sft_mix_path", "retention": "retention_path"}  # summary section -> data.* setting


def prepare_side_files(cfg: Config, tokenizer) -> tuple[dict[str, list], dict[str, dict]]:
    """The SFT files the config names beside the training data -> ({section: examples}, {section: summary section}).

    Prepared with the training data, so a row skipped in them is printed and written to data_summary.json
    like one of the training file's, not only counted where the file is used.
    """
    examples, sections = {}, {}
    for name, setting in SIDE_FILES.items():
        path = getattr(cfg.data, setting)
        if path:
            examples[name], sections[name] = prepare_sft_file(path, f"data.{setting}", cfg, tokenizer)
    return examples, sections
