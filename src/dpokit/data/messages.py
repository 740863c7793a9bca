"""Chat messages and tool definitions, normalised the one way every layout reads them.

A message is {"role", "content"}, plus, for agents, the keys chat templates read for tool use:
an assistant message's `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}]),
and a `tool` message's `tool_call_id` / `name`. A message with tool calls may have no text
(content None or missing becomes ""). Arguments given as a JSON string (OpenAI's wire format)
are parsed to an object, the form HF chat templates expect (`tool_call.arguments | tojson`);
a string that is not JSON skips the row.

The `tools` column holds the function schemas offered to the model: a list of JSON schemas
({"type": "function", "function": {"name", "description", "parameters"}}), one schema object,
or either of them as a JSON string (CSV and parquet exports often hold JSON text). It is passed
to the chat template as `tools=`, which renders it in the prompt.
"""

from __future__ import annotations

import json
from typing import Any

from dpokit.data.records import Conversation, Message
from dpokit.data.rows import RowSkip
from dpokit.inputs import UnreadableJSON, loads_bounded

TOOL_MESSAGE_KEYS = ("tool_call_id", "name")


def messages_of(value: Any, field: str, role_names: dict[str, str] | None = None) -> Conversation:
    """Normalise to [{"role", "content", ...tool keys}]; `role_names` (if given) maps and restricts the roles."""
    if value is None:
        raise RowSkip(f"{field} is missing", field)
    if not isinstance(value, list):
        raise RowSkip(f"{field} must be a list of messages, got {type(value).__name__}", field)
    if not value:
        raise RowSkip(f"{field} is an empty conversation", field)
    return [message_of(item, field, role_names) for item in value]


def message_of(item: Any, field: str, role_names: dict[str, str] | None = None) -> Message:
    if not isinstance(item, dict):
        raise RowSkip(f"{field} has a message that is not an object", field)
    role = item.get("role") if item.get("role") is not None else item.get("from")
    content = item.get("content") if item.get("content") is not None else item.get("value")
    tool_calls = item.get("tool_calls")
    if content is None and tool_calls:
        content = ""
    if not isinstance(role, str) or not role:
        raise RowSkip(f"{field} has a message without a role", field)
    if isinstance(content, list) and any(isinstance(part, dict) and part.get("type") == "image" for part in content):
        raise RowSkip(
            f"{field} has image content parts: set data.vision=true (and a vision-language model with a processor)",
            field,
        )
    if not isinstance(content, str):
        raise RowSkip(f"{field} has a message without text content", field)
    if role_names is not None:
        if role not in role_names:
            raise RowSkip(f"{field} has a message with unsupported role {role!r}", field)
        role = role_names[role]
    message: Message = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = _tool_calls(tool_calls, field)
    for key in TOOL_MESSAGE_KEYS:
        if isinstance(item.get(key), str):
            message[key] = item[key]
    return message


def _tool_calls(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowSkip(f"{field} has tool_calls that are not a list", field)
    calls = []
    for call in value:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowSkip(f"{field} has a tool call without a function name", field)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = loads_bounded(arguments) if arguments.strip() else {}
            except UnreadableJSON as error:
                raise RowSkip(f"{field} has tool call arguments that cannot be read: {error}", field) from None
            except json.JSONDecodeError:
                raise RowSkip(f"{field} has tool call arguments that are not valid JSON", field) from None
        entry = dict(call) if "function" in call else {}
        entry["type"] = entry.get("type", "function")
        entry["function"] = {**function, "arguments": arguments}
        calls.append(entry)
    return calls


def parse_tools(value: Any, field: str = "tools") -> list[dict] | None:
    """The row's `tools` column -> a list of function schemas, or None when the row offers no tools."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = loads_bounded(value)
        except UnreadableJSON as error:  # '['*10000: a RecursionError traceback in train and doctor before
            raise RowSkip(f"{field} cannot be read: {error}", field) from None
        except json.JSONDecodeError:
            raise RowSkip(
                f"{field} is a string that is not JSON (expected a list of function schemas)", field
            ) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise RowSkip(f"{field} must be a list of function schemas (JSON objects), got {type(value).__name__}", field)
    return value or None


def has_text_or_call(message: Message) -> bool:
    """A completion message that says something: non-blank text or at least one tool call."""
    return bool(message["content"].strip() or message.get("tool_calls"))
