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

A completion the chat template renders as nothing is skipped and counted too (`EmptyRender`):
one whose tool calls the template ignores (it renders the same with and without them:
TOOL_CALLS_IGNORED), or one that renders like an empty assistant reply, the end-of-turn marker
alone (END_MARKER_ONLY). Trained on, such pairs teach "an empty reply beats the answer".
Past data.max_empty_render_fraction of the pairs, preparing the data stops (`empty_render_problem`).
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


TOOL_CALLS_IGNORED = "the chat template ignores tool_calls: the completion renders the same without its tool calls"
END_MARKER_ONLY = "the completion renders to no token but the end-of-turn marker"
EMPTY_RENDER_REASONS = (TOOL_CALLS_IGNORED, END_MARKER_ONLY)
# An empty assistant reply renders to a few tokens (the end-of-turn marker, an empty think block at most);
# only completions this short can equal it, so longer ones skip the extra render.
_EMPTY_REPLY_MAX_TOKENS = 32


class EmptyRender(DataError):
    """One completion renders as nothing a model could learn from; `reason` is one of EMPTY_RENDER_REASONS."""

    def __init__(self, reason: str, side: str, source: str):
        super().__init__(f"{side}: {reason}", path=source)
        self.reason, self.side = reason, side


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
            prompt = encoded_ids(
                tokenizer.apply_chat_template(example.prompt, tokenize=True, add_generation_prompt=True, **extra)
            )
            full_chosen = encoded_ids(
                tokenizer.apply_chat_template(example.prompt + example.chosen, tokenize=True, **extra)
            )
            full_rejected = encoded_ids(
                tokenizer.apply_chat_template(example.prompt + example.rejected, tokenize=True, **extra)
            )
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
    for side, completion, full in (
        ("chosen", example.chosen, full_chosen),
        ("rejected", example.rejected, full_rejected),
    ):
        if side == "rejected" and example.rejected is example.chosen:  # one completion rendered twice (unpaired rows)
            break
        if example.conversational:
            _check_rendered(tokenizer, example, side, completion, full, len(full) - n)
        elif list(full[n:]) == [tokenizer.eos_token_id]:  # text the tokenizer turns into nothing
            raise EmptyRender(END_MARKER_ONLY, side, example.source)
    return list(prompt[:n]), list(full_chosen[n:]), list(full_rejected[n:])


def _check_rendered(tokenizer, example, side: str, completion: list, full: list[int], completion_tokens: int) -> None:
    """Raise EmptyRender when `completion` renders (in `full`, the whole conversation) as nothing: its tool
    calls ignored, or no more than an empty assistant reply. A template that refuses the comparison render
    proves nothing either way: the completion is kept."""

    def same_render(messages: list) -> bool:
        try:
            rendered = tokenizer.apply_chat_template(
                example.prompt + messages, tokenize=True, **template_kwargs(example)
            )
        except Exception:  # noqa: BLE001 (any template error: see the docstring)
            return False
        return encoded_ids(rendered) == list(full)

    without_calls = [{k: v for k, v in m.items() if k != "tool_calls"} for m in completion]
    if any(m.get("tool_calls") for m in completion) and same_render(without_calls):
        raise EmptyRender(TOOL_CALLS_IGNORED, side, example.source)
    if completion_tokens <= _EMPTY_REPLY_MAX_TOKENS and same_render([{"role": "assistant", "content": ""}]):
        raise EmptyRender(END_MARKER_ONLY, side, example.source)


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
        except EmptyRender as empty:
            if report is None:
                raise
            report.skip(empty.reason, f"{ex.source} ({empty.side})")
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


def empty_render_problem(report: SkipReport, examples: int, limit: float, path: str, unit: str = "pairs") -> str | None:
    """The error when more than `limit` (data.max_empty_render_fraction) of the `examples` tokenised (pairs, or
    completions: `unit`) were skipped as rendered to nothing: then the template, not a few odd rows, is at fault."""
    counts = {reason: report.skipped[reason] for reason in EMPTY_RENDER_REASONS if report.skipped[reason]}
    skipped = sum(counts.values())
    if not examples or skipped / examples <= limit:
        return None
    causes = "; ".join(f"{reason} ({n}, e.g. {', '.join(report.examples[reason][:2])})" for reason, n in counts.items())
    return (
        f"{path}: {skipped} of {examples} {unit} ({skipped / examples:.0%}, above data.max_empty_render_fraction={limit:g}) "
        f"have a completion the chat template renders as nothing: {causes}. Trained on, they teach that an empty reply "
        "beats the answer. Use a chat template that renders tool calls (the model's own, if it was trained for tool "
        "use), or remove these rows"
    )
