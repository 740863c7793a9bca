"""The config's error and its message helpers: the key named, a short excerpt of the value, the closest valid key."""

from __future__ import annotations

import difflib
import reprlib
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key."""


# Error messages quote the offending value; a short excerpt is enough to find it, and a huge value
# (an expanded alias, a pasted file) must not turn one error line into megabytes of output.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def excerpt(value: Any, limit: int = 120) -> str:
    """repr(value) cut to about `limit` characters, without building the full repr of a large value."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"config key {key!r} must be one of {', '.join(choices)}; got {excerpt(value)}"
            + suggest(value, list(choices)).replace("valid keys", "valid values")
        )
