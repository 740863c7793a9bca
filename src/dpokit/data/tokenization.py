"""Preference records -> token ids: prompt ids, chosen ids, rejected ids.

Text records are tokenised as prompt and prompt + completion + EOS; conversational
records go through the tokenizer's chat template (with the row's `tools=` when it has
any), the prompt rendered with the generation prompt. In both cases the completion is where the tokenised prompt
and the tokenised prompt + completion diverge (as TRL does), so a token merged
across the boundary is never split and the prompt is never counted in the loss.

Truncation, applied in this order:
  1. the prompt is cut from the LEFT to `max_prompt_length` tokens, so the
     latest turns of a long conversation survive;
  2. each completion is cut from the RIGHT so prompt + completion <= `max_length`
     (a cut completion loses its EOS: the model is not taught to stop there).
A pair whose chosen or rejected completion is empty after this is skipped and
counted, never fed to the loss (an empty completion gives a zero log-prob and a
meaningless reward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpokit.data.records import DataError, PreferenceExample, SkipReport


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    # every_turn rows: the judged turn (a row's pairs share its source). Not in repr, which fingerprints
    # the training data for resume (training/resume.py): the token ids already tell the pairs apart.
    turn: int = field(default=0, repr=False, compare=False)


@dataclass
class TokenizationStats:
    prompts_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})

    def percentiles(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, values in self.lengths.items():
            if not values:
                continue
            ordered = sorted(values)
            pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
            out[name] = {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}
        return out


class TemplateRefused(DataError):
    """The chat template raised on one conversation (a row problem: tokenize_pairs skips and counts it)."""

    cause = ""


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encoded_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def template_kwargs(example) -> dict:
    """Extra chat-template arguments of one record: `tools=` when the row offers tools (data/messages.py)."""
    return {"tools": example.tools} if getattr(example, "tools", None) else {}


def render_ids(example: PreferenceExample, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Full-length (untruncated) prompt ids and chosen/rejected completion ids."""
    if example.conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "conversational data needs a tokenizer with a chat template, and this tokenizer has none; "
                "use a chat model's tokenizer or give text prompt/chosen/rejected columns",
                path=example.source,
            )
        extra = template_kwargs(example)
        try:
            prompt = encoded_ids(tokenizer.apply_chat_template(example.prompt, tokenize=True, add_generation_prompt=True, **extra))
            full_chosen = encoded_ids(tokenizer.apply_chat_template(example.prompt + example.chosen, tokenize=True, **extra))
            full_rejected = encoded_ids(tokenizer.apply_chat_template(example.prompt + example.rejected, tokenize=True, **extra))
        except Exception as error:  # e.g. a template's raise_exception("roles must alternate user/assistant")
            refused = TemplateRefused(
                f"the tokenizer's chat template cannot render this conversation ({type(error).__name__}: {error})",
                path=example.source,
            )
            refused.cause = f"{type(error).__name__}: {error}"
            raise refused from None
    else:
        eos = tokenizer.eos_token or ""
        chosen_text = example.chosen if example.chosen.endswith(eos) else example.chosen + eos
        rejected_text = example.rejected if example.rejected.endswith(eos) else example.rejected + eos
        prompt = tokenizer(example.prompt)["input_ids"]
        full_chosen = tokenizer(example.prompt + chosen_text)["input_ids"]
        full_rejected = tokenizer(example.prompt + rejected_text)["input_ids"]
    n = min(_common_prefix_length(prompt, full_chosen), _common_prefix_length(prompt, full_rejected))
    return list(prompt[:n]), list(full_chosen[n:]), list(full_rejected[n:])


def tokenize_pairs(
    examples: list[PreferenceExample],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    report: SkipReport | None = None,
) -> tuple[list[TokenizedPair], TokenizationStats]:
    """Tokenise and truncate every record; skipped pairs are counted in `report` by reason."""
    stats = TokenizationStats()
    out: list[TokenizedPair] = []
    # A row stops counting as used when all its pairs are skipped: one pair for most layouts, one per
    # judged turn for every_turn rows (which share their source "file:row").
    row_of = lambda ex: ex.source if getattr(ex, "turn", 0) else id(ex)  # noqa: E731
    dropped_rows, kept_rows = set(), set()
    for ex in examples:
        try:
            prompt, chosen, rejected = render_ids(ex, tokenizer)
        except TemplateRefused as error:
            if report is None:
                raise
            report.skip("the chat template cannot render the conversation", f"{ex.source} ({error.cause[:80]})")
            dropped_rows.add(row_of(ex))
            continue
        if len(prompt) > max_prompt_length:
            prompt = prompt[len(prompt) - max_prompt_length :]
            stats.prompts_truncated += 1
        room = max_length - len(prompt)
        if len(chosen) > room:
            chosen = chosen[:room]
            stats.chosen_truncated += 1
        if len(rejected) > room:
            rejected = rejected[:room]
            stats.rejected_truncated += 1
        if not chosen or not rejected:
            which = "chosen" if not chosen else "rejected"
            if report is not None:
                report.skip(f"empty {which} completion after tokenisation/truncation", f"{ex.source} ({which})")
                dropped_rows.add(row_of(ex))
            continue
        stats.lengths["prompt"].append(len(prompt))
        stats.lengths["chosen"].append(len(chosen))
        stats.lengths["rejected"].append(len(rejected))
        out.append(TokenizedPair(prompt, chosen, rejected, ex.source, getattr(ex, "turn", 0)))
        kept_rows.add(row_of(ex))
    if report is not None:
        report.rows_used -= len(dropped_rows - kept_rows)
    return out, stats
