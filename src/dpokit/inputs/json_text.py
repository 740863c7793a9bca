"""JSON from untrusted text (a data row's `tools` column, a JSON line), with a bound on nesting.

Python's json module recurses once per `[` or `{`: text nested thousands deep raises RecursionError
(or worse, exhausts the C stack in some builds). A real tool schema or row is nested a few dozen
levels; `MAX_JSON_DEPTH` is far above that. The depth is measured by one linear scan that skips
strings, before the parser runs, so the refusal is a clear ValueError naming the depth.
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 200


def json_depth(text: str | bytes, stop_at: int = MAX_JSON_DEPTH) -> int:
    """Deepest nesting of [ and { outside strings; stops counting once past `stop_at`."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_at:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest


class UnreadableJSON(ValueError):
    """JSON that parses in principle but not here: nested too deeply, or an integer of thousands of digits."""


class JSONTooDeep(UnreadableJSON):
    """Text nested deeper than MAX_JSON_DEPTH."""


def loads_bounded(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads(text), refused with JSONTooDeep (a ValueError) when nested deeper than `max_depth`.

    Malformed JSON raises json.JSONDecodeError as usual; an integer past Python's digit limit raises
    UnreadableJSON (JSONTooDeep's base); nothing raises RecursionError.
    """
    opens = text.count("[") + text.count("{") if isinstance(text, str) else text.count(b"[") + text.count(b"{")
    if opens > max_depth and json_depth(text, max_depth) > max_depth:  # the count is a cheap first filter
        raise JSONTooDeep(f"JSON nested more than {max_depth} levels deep (of [ or {{)")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:  # a depth under the limit on a very small stack: still a clear error
        raise JSONTooDeep("JSON nested too deeply to read") from None
    except ValueError as error:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise UnreadableJSON(f"JSON holds a number Python will not read ({str(error)[:60]})") from None
