"""The normalised preference record every row layout is converted to, and data errors.

A record is either *text* (prompt, chosen, rejected are strings, joined as
prompt + completion + EOS) or *conversational* (prompt is a list of chat
messages, chosen/rejected are lists of assistant messages, rendered through the
tokenizer's chat template). Downstream code never sees the source layout.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Union

from dpokit.inputs import InputError

Message = dict[str, Any]  # {"role": str, "content": str}
Text = str
Conversation = list[Message]


@dataclass
class PreferenceExample:
    prompt: Union[Text, Conversation]
    chosen: Union[Text, Conversation]
    rejected: Union[Text, Conversation]
    source: str = ""  # "file:row" for error messages downstream (e.g. "data.jsonl:17")
    tools: list[dict] | None = None  # function schemas passed to the chat template as tools= (data/messages.py)
    turn: int = 0  # every_turn rows: which judged assistant turn of the conversation (1, 2, ...); 0 otherwise

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


class DataError(InputError):
    """A user-facing data problem; the message names the file, row and field (the gateway's InputError, for data)."""


@dataclass
class SkipReport:
    """Counts rows read/used and rows skipped by reason, with a few examples of each.

    Nothing is ever dropped without being counted here; the training run prints
    this at start and writes it to the run directory.
    """

    rows_read: int = 0
    rows_used: int = 0
    held_out: int = 0  # rows moved to the eval split (data.eval_fraction)
    prompts: int = 0  # distinct prompts among the split's rows (the eval split holds out whole prompts)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> ["file:row (field)"]
    layouts: Counter = field(default_factory=Counter)  # detected layout name -> rows
    conversations: int = 0  # every_turn rows used (data/turns.py) ...
    turn_pairs: int = 0  # ... and the pairs they expanded to, one per judged assistant turn
    read_stopped_at: int | None = None  # data.max_rows: reading stopped after this many used rows (more followed)

    def count_turns(self, groups: list[list[Any]]) -> None:
        """Set the every_turn counts from one split's rows: a group of examples per row, each with a `turn`.

        A pair counts once, whether it is one PreferenceExample or split into two KTO halves.
        """
        turn_groups = [group for group in groups if any(example.turn for example in group)]
        self.conversations = len(turn_groups)
        self.turn_pairs = sum(len({example.turn for example in group}) for group in turn_groups)

    def skip(self, reason: str, where: str, count: int = 1) -> None:
        self.skipped[reason] += count
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "rows_skipped": self.rows_skipped,
            "held_out": self.held_out,
            "prompts": self.prompts,
            "skipped_by_reason": dict(self.skipped),
            "skipped_examples": self.examples,
            "layouts": dict(self.layouts),
            "every_turn": {"conversations": self.conversations, "pairs": self.turn_pairs},
            "read_stopped_at_max_rows": self.read_stopped_at,
        }
