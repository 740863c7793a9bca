"""Supervised fine-tuning as a trainer Task: completion-only NLL, the prompt masked out.

`dpokit sft CONFIG` (or `train.task: sft`) runs the ordinary training loop with this Task,
so SFT shares the config, data loading, run directory, metrics log, evaluation and saving of
`dpokit train`. Row layouts (detected per file, or forced with `data.layout`):

    prompt + completion      text, or conversational (prompt messages + assistant completion
                             messages); a `label` column is allowed: rows labelled false
                             (undesirable) are skipped and counted, never imitated
    messages                 a whole conversation; the last message, an assistant turn, is the
                             completion and everything before it the prompt
    any paired layout        prompt/chosen/rejected, hh-rlhf, ShareGPT, OpenAI, ...: the chosen
                             side (SFT on chosen = the DPO paper's "Preferred-FT" baseline)

Tokenisation and truncation are the paired data's (`tokenization.render_ids`: prompt +
completion + EOS, or the chat template; prompt cut from the left, completion from the right).

Loss: the mean token NLL over the completion tokens of the optimizer step,

    loss = sum_i sum_{t in completion_i} -log pi(y_t | x, y_<t)  /  sum_i |completion_i|

`forward` returns each example's *summed* NLL, and `count` (a batch) and `weight` (an example) give
completion tokens, so the trainer's division of the step's loss sum by its count is that token mean
exactly, whatever the batch size, gradient accumulation and number of processes (TRL averages per
micro-batch instead).

Metrics (averaged over the logging window, like every dpokit metric):
    loss                  mean NLL per completion token (the quantity minimised)
    mean_token_accuracy   share of completion tokens that are the model's argmax prediction
    num_tokens            running total of the input tokens (prompt + completion) trained on, as TRL's
"""

from __future__ import annotations

import dataclasses

import torch

from dpokit.config import Config
from dpokit.data.collate import pad_completions
from dpokit.data.packing import collate_packed_sequences
from dpokit.data.layouts import LAYOUTS, load_preferences
from dpokit.data.loading import read_rows
from dpokit.data.records import DataError, SkipReport
from dpokit.data.rows import RowSkip, cap_rows, convert_rows, no_usable_rows_message
from dpokit.data.token_health import check_completion_health
from dpokit.data.unpaired import (
    TokenizedCompletion,
    UnpairedExample,
    _from_messages,
    _from_prompt_completion,
    _rename,
    detect_unpaired_layout,
    parse_label,
    tokenize_groups,
)
from dpokit.logprobs import IGNORE_INDEX, token_logps
from dpokit.losses import LossOutput
from dpokit.preference_step import layout_for, per_sequence, score_tokens
from dpokit.tasks import Task

SFT_LAYOUTS = ("prompt_completion", "messages")
# data.layout values that name the unpaired layouts (the KTO names are accepted too).
_LAYOUT_ALIASES = {"prompt_completion": "prompt_completion", "prompt_completion_label": "prompt_completion",
                   "messages": "messages", "messages_label": "messages"}
_CONVERTERS = {"prompt_completion": _from_prompt_completion, "messages": _from_messages}
SFT_COLUMNS = ("prompt", "completion", "messages", "label")  # those of unpaired data: `_rename` maps them


# --- rows -> examples -----------------------------------------------------------------------


def _is_paired_file(path: str, split: str, columns: dict[str, str], layout: str) -> bool:
    if layout in LAYOUTS or {"chosen", "rejected"} & set(columns):
        return True
    if layout in _LAYOUT_ALIASES or {"completion", "messages"} & set(columns):
        return False
    if layout != "auto":
        expected = ", ".join(("auto",) + SFT_LAYOUTS + LAYOUTS)
        raise DataError(f"unknown layout {layout!r} for SFT data; expected one of {expected}", path)
    for _, row in read_rows(path, split):
        row = _rename(row, columns)
        return "chosen" in row or "rejected" in row or detect_unpaired_layout(row) is None
    return False


def load_sft(
    path: str, split: str = "train", columns: dict[str, str] | None = None, layout: str = "auto", strict: bool = False
) -> tuple[list[UnpairedExample], SkipReport]:
    """Read every row of `path` as one SFT example (prompt, completion); bad rows skipped and counted."""
    columns = dict(columns or {})
    if _is_paired_file(path, split, columns, layout):
        pairs, report = load_preferences(path, split, columns or None, layout, strict)
        report.layouts = type(report.layouts)({f"{name} (chosen side)": n for name, n in report.layouts.items()})
        return [UnpairedExample(p.prompt, p.chosen, True, p.source) for p in pairs], report
    unknown = set(columns) - set(SFT_COLUMNS)
    if unknown:
        raise DataError(f"columns for SFT data map {', '.join(SFT_COLUMNS)} to column names; got {columns!r}", path)

    def convert(row: dict, where: str) -> tuple[str, UnpairedExample]:
        row = _rename(row, columns)
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
        return row_layout, UnpairedExample(prompt, completion, True, where)

    examples, report = convert_rows(path, split, convert, strict)
    if not examples:
        raise DataError(no_usable_rows_message(report), path)
    return examples, report


def _load(path: str, split: str, cfg: Config):
    examples, report = load_sft(path, split, cfg.data.columns or None, cfg.data.layout, cfg.data.strict)
    return cap_rows(examples, report, path, cfg.data.max_rows), report


def prepare_sft(cfg: Config, tokenizer):
    """config.data -> PreparedData of TokenizedCompletion (train, eval) with the usual data summary.

    The eval split (data.eval_path, else a seeded data.eval_fraction of the rows) is that of
    `prepare_data`; the summary's token lengths name the completion `completion`.
    """
    from dpokit.data.prepare import PreparedData, _summary, load_train_and_eval

    train_examples, train_report, eval_examples, eval_report = load_train_and_eval(cfg, _load)
    summary, splits = {}, []
    for name, examples, report in (("train", train_examples, train_report), ("eval", eval_examples, eval_report)):
        tokenized, stats = tokenize_groups([[e] for e in examples], tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, report)
        stats.lengths = {"prompt": stats.lengths["prompt"], "completion": stats.lengths["chosen"]}
        summary[name] = _summary(report, stats, len(tokenized))  # "pairs" here counts examples
        splits.append(tokenized)
    summary["train"]["token_health"] = check_completion_health(train_examples, splits[0], tokenizer, cfg.data.path)
    return PreparedData(splits[0], splits[1], summary)


# --- batches and the step ---------------------------------------------------------------------


def collate_sft(examples: list[TokenizedCompletion], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels: (B, T), right-padded; labels hold only the completion tokens."""
    return pad_completions([(e.prompt_ids, e.completion_ids) for e in examples], pad_token_id)


def count_tokens(batch: dict) -> int:
    """Completion (trained) tokens in the batch (collate_sft's or a packed one): the loss is a mean over these."""
    if "score_pos" in batch:
        return int(batch["score_pos"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def make_sft_collate(speed, attn_implementation=None):
    """(examples, pad_token_id) -> a padding-free batch (data/packing.py) for forward_sft_fast."""
    layout = layout_for(speed, attn_implementation)

    def collate(examples: list[TokenizedCompletion], pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate_packed_sequences([(e.prompt_ids, e.completion_ids) for e in examples], pad_token_id, layout)

    return collate


def example_tokens(example: TokenizedCompletion) -> int:
    """Completion tokens of one example that get a loss (`count_tokens` of a batch is their sum).

    A token is predicted from the ones before it, so with an empty prompt the first completion
    token has no loss.
    """
    return len(example.completion_ids) - (0 if example.prompt_ids else 1)


def forward_sft(policy, reference, batch: dict, cfg: Config, with_reference: bool) -> tuple:
    """-> (LossOutput with each example's summed completion NLL, metrics: name -> tensor of values).

    `reference` and `with_reference` are ignored: SFT has no reference model.
    """
    labels = batch["labels"]
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    tok_logps, mask = token_logps(logits, labels)  # (B, T-1), zero off the completion
    nll = -tok_logps
    out = LossOutput(nll.sum(-1), torch.zeros(0), torch.zeros(0))
    with torch.no_grad():
        correct = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask
        metrics = {
            "loss": nll.detach()[mask],  # one value per completion token: the window average is the token mean
            "mean_token_accuracy": correct[mask].float(),
        }
    return out, metrics


def forward_sft_fast(policy, reference, batch: dict, cfg: Config, with_reference: bool) -> tuple:
    """forward_sft on a make_sft_collate batch: padding-free rows, the LM head on completion tokens only, by chunks
    with `speed.chunked_logps` (preference_step.score_tokens). Same losses, metrics and gradients (tests/test_sft.py)."""
    scores = score_tokens(policy, batch, cfg.speed, want_stats=True)
    nll = -scores.logp
    out = LossOutput(per_sequence(nll, batch["score_seq"], batch["seq_lengths"].shape[0]), torch.zeros(0), torch.zeros(0))
    order = batch["score_order"]  # forward_sft's (example, token) order
    return out, {"loss": nll.detach()[order], "mean_token_accuracy": scores.stats[order, 2]}


def _no_reference(cfg: Config) -> bool:
    return False


def input_tokens(example: TokenizedCompletion) -> int:
    """Prompt + completion tokens: what TRL's running `num_tokens` counts for SFT."""
    return len(example.prompt_ids) + len(example.completion_ids)


# `needs_reference`: SFT builds no reference model; `weight`: a step's loss is divided by its completion
# tokens (over all micro-batches and processes), not its examples; `name` labels the progress bar.
SFT = Task(prepare=prepare_sft, collate=collate_sft, count=count_tokens, forward=forward_sft, needs_reference=_no_reference,
           weight=example_tokens, tokens=input_tokens, name="sft")


def fast_sft(cfg: Config) -> Task:
    """SFT on padding-free rows (speed.packing) and/or with the chunked LM head (speed.chunked_logps)."""
    return dataclasses.replace(SFT, collate=make_sft_collate(cfg.speed, cfg.model.attn_implementation), forward=forward_sft_fast)
