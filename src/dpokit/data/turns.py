"""Every turn of a conversation: rows with a preference at several assistant turns -> one pair per turn.

Layout `every_turn`: a `messages` conversation in which each assistant turn that was judged
holds `chosen` and `rejected` instead of `content`; the other messages are context:

    {"messages": [
        {"role": "user", "content": "Plan a trip to Rome."},
        {"role": "assistant", "chosen": "Day 1: the Colosseum ...", "rejected": "Go to Paris."},
        {"role": "user", "content": "Cheaper?"},
        {"role": "assistant", "chosen": "Stay in Trastevere ...", "rejected": "No."}]}

`chosen` / `rejected` are a text, or a whole assistant message (e.g. one with `tool_calls`).
Each judged turn becomes its own pair whose prompt is the conversation so far, with the chosen
reply at every earlier judged turn (the conversation continued from the chosen branch, as in
multi-turn preference sets built turn by turn). A row without a judged turn is not this layout;
a row whose judged turns are malformed is skipped with its reason, as a whole: half a
conversation is never trained silently. The pairs of one row share its prompt's beginning, so
`speed.prefix_sharing` (which shares a prompt between its chosen and rejected, not across pairs)
still computes each pair's prompt once.
"""

from __future__ import annotations

from typing import Any

from dpokit.data.messages import has_text_or_call, message_of
from dpokit.data.records import Conversation, Message
from dpokit.data.rows import RowSkip

SIDES = ("chosen", "rejected")


def is_judged(message: Any) -> bool:
    return isinstance(message, dict) and any(side in message for side in SIDES)


def has_turn_preferences(messages: Any) -> bool:
    """Whether a `messages` value is an every-turn conversation (some message holds chosen/rejected)."""
    return isinstance(messages, list) and any(is_judged(message) for message in messages)


def expand_turns(row: dict) -> list[tuple[Conversation, Conversation, Conversation]]:
    """(prompt, [chosen], [rejected]) for each judged assistant turn of row["messages"], in order."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowSkip("messages must be a non-empty list of messages", "messages")
    history: Conversation = []
    pairs = []
    for number, item in enumerate(messages, start=1):
        if not is_judged(item):
            history.append(message_of(item, "messages"))
            continue
        where = f"messages[{number - 1}]"
        if item.get("role", "assistant") != "assistant":
            raise RowSkip(
                f"{where} holds chosen/rejected but its role is {item.get('role')!r}, not assistant", "messages"
            )
        if item.get("content") is not None:
            raise RowSkip(
                f"{where} holds content as well as chosen/rejected: which one was said is ambiguous", "messages"
            )
        if not history:
            raise RowSkip(f"{where} is a judged turn with no prompt before it", "messages")
        chosen, rejected = (_side(item, side, where) for side in SIDES)
        pairs.append((list(history), [chosen], [rejected]))
        history.append(chosen)
    return pairs


def _side(item: dict, side: str, where: str) -> Message:
    value = item.get(side)
    if value is None:
        raise RowSkip(f"{where} has {'rejected' if side == 'chosen' else 'chosen'} but no {side}", side)
    if isinstance(value, str):
        value = {"role": "assistant", "content": value}
    if not isinstance(value, dict):
        raise RowSkip(f"{where}.{side} must be a text or an assistant message, got {type(value).__name__}", side)
    message = message_of({"role": "assistant", **value}, f"{where}.{side}")
    if message["role"] != "assistant":
        raise RowSkip(f"{where}.{side} must be an assistant message", side)
    if not has_text_or_call(message):
        raise RowSkip(f"{side} is empty or whitespace-only", side)
    return message
