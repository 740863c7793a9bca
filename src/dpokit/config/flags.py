"""Command-line flags as aliases of config keys, and the one way a verb is registered.

A verb that reads the config lists its flags in one table of `Flag(names, key, help)`: each flag sets
one config key, and its type, default and choices come from that key's field in `Config`, so a flag
cannot drift from the config it stands for. `dpokit sample --num-samples 8` and
`dpokit sample sampling.num_samples=8` are the same setting:

    CONFIG (YAML)  <  flags  <  key=value      (each later one wins)

`Verb` is how every verb is registered (the table in commands.py, `verbs()`): its name, its help, the function that adds
its arguments and the one that runs it; a verb with `flags` also takes [CONFIG] [key=value ...].
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from dpokit.config.errors import ConfigError
from dpokit.config.loading import load_config, resolve_config_path
from dpokit.config.schema import Config


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key."""

    names: tuple[str, ...]  # e.g. ("-n", "--num-samples")
    key: str  # the config key it sets, e.g. "sampling.num_samples"
    help: Union[str, Callable[[], str]] = ""  # a callable: made when the parser is built (from a table that may grow)
    dest: Optional[str] = None  # the parsed attribute (default: the long name); the input gateway and suites read it
    metavar: Optional[str] = None
    choices: Union[tuple, Callable[[], tuple], None] = None  # a fixed set (a callable: read when the parser is built)
    repeat: bool = False  # given several times, each adds an item to the key's list

    @property
    def attr(self) -> str:
        return self.dest or self.names[-1].lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Verb:
    """One `dpokit` verb. arguments(parser) adds what it takes besides its flags; run(args) -> exit status."""

    name: str
    help: str
    description: str
    run: Callable[[Any], int]
    arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    flags: tuple[Flag, ...] = ()  # aliases of config keys: the verb then takes [CONFIG] [key=value ...] as well


def key_field(key: str) -> tuple[Any, Any]:
    """(the default, the type annotation) of a dotted config key; ConfigError when Config has no such key."""
    owner, default = Config, Config()
    *sections, name = key.split(".")
    for section in sections:
        if section not in {f.name for f in dataclasses.fields(owner)}:
            raise ConfigError(f"no config section {section!r} (key {key!r})")
        owner = typing.get_type_hints(owner)[section]
        default = getattr(default, section)
    if not dataclasses.is_dataclass(owner) or name not in {f.name for f in dataclasses.fields(owner)}:
        raise ConfigError(f"no config key {key!r}")
    return getattr(default, name), typing.get_type_hints(owner)[name]


def _scalar_type(tp) -> Any:
    """int, float, bool or str: what the flag's text is parsed as (Optional[int] -> int)."""
    if typing.get_origin(tp) is Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    return tp if tp in (int, float, bool) else str


def _shown(value) -> str:
    return "none" if value in (None, "") else "[]" if value == [] else str(value)


def add_flags(parser: argparse.ArgumentParser, flags: tuple[Flag, ...]) -> None:
    """The flags, each parsed to its key's type; unset flags leave no attribute (the config's value stands)."""
    for flag in flags:
        default, tp = key_field(flag.key)
        kind = _scalar_type(tp)
        helped = flag.help() if callable(flag.help) else flag.help
        choices = flag.choices() if callable(flag.choices) else flag.choices
        where = f"config key {flag.key}" + ("" if helped.endswith("(required)") else f"; default {_shown(default)}")
        text = f"{helped} ({where})" if helped else f"({where})"
        kwargs: dict[str, Any] = {"dest": flag.attr, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=None if kind is str else kind, metavar=flag.metavar, choices=choices)
            if flag.repeat:
                kwargs["action"] = "append"
        parser.add_argument(*flag.names, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser, flags: tuple[Flag, ...]) -> None:
    """[CONFIG] [key=value ...] and the flags: the arguments of a verb that reads the config."""
    parser.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="YAML file (or shipped config name) with this verb's sections; optional",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
    add_flags(parser, flags)


def flag_overrides(args: argparse.Namespace, flags: tuple[Flag, ...]) -> list[tuple[str, Any]]:
    """(key, value) of every flag given on the command line."""
    out = []
    for flag in flags:
        if hasattr(args, flag.attr):
            value = getattr(args, flag.attr)
            out.append((flag.key, list(dict.fromkeys(value)) if flag.repeat else value))
    return out


def config_from_args(args: argparse.Namespace, flags: tuple[Flag, ...]) -> Config:
    """The Config of a verb's command line: defaults, then CONFIG, then the flags, then key=value."""
    source, overrides = getattr(args, "config", None), list(getattr(args, "overrides", None) or [])
    if source and "=" in source and not Path(source).exists():  # `dpokit sample key=value ...`: no CONFIG given
        source, overrides = None, [source] + overrides
    return load_config(resolve_config_path(source) if source else None, flag_overrides(args, flags) + overrides)


def get_key(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def resolved_args(cfg: Config, flags: tuple[Flag, ...], **extra) -> argparse.Namespace:
    """Every flag's attribute with its key's value in `cfg`: what the verb was asked, however it was said (the
    input gateway and the suites' checks read the files and options by these names)."""
    return argparse.Namespace(**{flag.attr: get_key(cfg, flag.key) for flag in flags}, **extra)


def require(cfg: Config, key: str, flag: str, what: str) -> Any:
    """The value of a key the verb cannot run without; ConfigError naming the key and its flag otherwise."""
    value = get_key(cfg, key)
    if value in (None, ""):
        raise ConfigError(f"{what} is required: give {flag} or {key}=...")
    return value
