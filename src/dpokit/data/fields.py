"""Reading one field of a row and checking its value: present, text or a message list, a usable
completion, valid Unicode. A problem raises `RowSkip` naming the field, so the skip report says which
column of which row was wrong. Shared by the paired layouts, the unpaired (KTO) rows and image rows.
"""

from __future__ import annotations

from typing import Any

from dpokit.data.messages import has_text_or_call, messages_of
from dpokit.data.records import Conversation
from dpokit.data.rows import RowSkip

Field = str | Conversation


def required(row: dict, field: str) -> Any:
    if row.get(field) is None:
        raise RowSkip(f"{field} is missing", field)
    return row[field]


def required_text(row: dict, field: str) -> str:
    value = required(row, field)
    if not isinstance(value, str):
        raise RowSkip(f"{field} must be a string, got {type(value).__name__}", field)
    return value


def text_or_messages(row: dict, field: str) -> Field:
    value = required(row, field)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return messages_of(value, field)
    raise RowSkip(f"{field} must be a string or a list of messages, got {type(value).__name__}", field)


def check_same_kind(prompt: Field, chosen: Field, rejected: Field) -> None:
    conversational = isinstance(chosen, list)
    for field, value in (("rejected", rejected), ("prompt", prompt)):
        if isinstance(value, list) != conversational:
            raise RowSkip("prompt, chosen and rejected mix text and message lists", field)


def check_completion(value: Field, field: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise RowSkip(f"{field} is empty or whitespace-only", field)
        return
    if not value:
        raise RowSkip(f"{field} is an empty conversation", field)
    if value[0]["role"] != "assistant":
        raise RowSkip(f"{field} does not start with an assistant message", field)
    if not any(has_text_or_call(message) for message in value):
        raise RowSkip(f"{field} is empty or whitespace-only", field)


def check_unicode(value: Field, field: str) -> None:
    """JSON can escape half of a surrogate pair ("\\ud800"): such text cannot be encoded or tokenised."""
    texts = (
        [value] if isinstance(value, str) else [t for m in value for t in (m["role"], m["content"])]
    )  # tool-call names/arguments are JSON-checked
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RowSkip(
                f"{field} holds text that is not valid Unicode (an unpaired surrogate such as \\ud800)", field
            ) from None
