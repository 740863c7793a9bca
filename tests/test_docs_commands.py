"""Every documented command and call works as written: README.md and docs/*.md.

As litgpt loads every shipped config in a test, this reads every `dpokit VERB ...` line of the
shell blocks and every `dpokit.train(...)` call (code blocks and inline code) and checks it
against the code that reads it:
  - the command line parses with `dpokit`'s own argument parser (verb, flags, arguments);
  - its key=value overrides name real config keys with valid values (train, sft, precompute,
    config, doctor: the training config; sample, score, pair, eval: the config their flags and
    key=value make);
  - a Python call binds to `dpokit.train`'s signature, and its overrides are valid config keys.
Placeholders (CONFIG, `...`, `[key=value ...]`) and console output are not commands.
"""

from __future__ import annotations

import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest

import dpokit
from dpokit.cli import build_parser, parse_command_line
from dpokit.commands import verbs
from dpokit.config import load_config
from dpokit.config.flags import config_from_args

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
TRAINING_VERBS = ("train", "sft", "precompute", "config", "doctor")
FLAG_VERBS = {verb.name: verb for verb in verbs() if verb.flags}  # sample, score, pair, eval: flags are config keys


def _blocks(text: str):
    """(info string, body) of each fenced code block."""
    for match in re.finditer(r"^```([\w-]*)\n(.*?)^```", text, flags=re.S | re.M):
        yield match.group(1), match.group(2)


def _shell_lines(body: str):
    """Logical lines of a shell block: backslash continuations joined."""
    line = ""
    for raw in body.splitlines():
        line += raw.rstrip()
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        yield line.strip()
        line = ""


def _verbs() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "verb")  # argparse keeps sub-parsers on this action
    return set(action.choices)


def documented_commands() -> list[tuple[str, str]]:
    verbs = _verbs()
    found = []
    for page in PAGES:
        for info, body in _blocks(page.read_text(encoding="utf-8")):
            if info not in SHELL_BLOCKS:
                continue
            for line in _shell_lines(body):
                for command in re.split(r"\s*&&\s*", line):
                    if not re.match(r"(\.venv/bin/)?dpokit \w", command):
                        continue
                    words = shlex.split(command, comments=True)
                    if len(words) < 2 or words[0] not in ("dpokit", ".venv/bin/dpokit") or words[1] not in verbs:
                        continue  # not a dpokit command (output lines read "dpokit doctor: ...")
                    if any(w in ("...", "CONFIG", "VERB") or w.startswith("[") for w in words):
                        continue  # a usage line with placeholders
                    found.append((f"{page.name}: {command}", command))
    return found


def documented_calls() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for call in re.findall(r"dpokit\.train\((?:[^()]|\([^()]*\))*\)", text):
            found.append((f"{page.name}: {call}", call))
    return found


COMMANDS = documented_commands()
CALLS = documented_calls()


def test_the_docs_hold_commands_and_calls():
    assert len(COMMANDS) >= 30, COMMANDS  # the scan finds the documented commands (a broken scan would test nothing)
    assert len(CALLS) >= 2, CALLS


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, command):
    words = shlex.split(command, comments=True)[1:]
    try:
        args = parse_command_line(words)  # as `dpokit` reads it: key=value after an option is an override too
    except SystemExit as e:
        pytest.fail(f"{where}: the parser rejects it (exit {e.code})")
    overrides = [w for w in getattr(args, "overrides", None) or [] if "=" in w]
    if args.verb in TRAINING_VERBS and overrides:
        load_config(None, overrides)  # unknown keys and bad values raise ConfigError naming the key
    if args.verb in FLAG_VERBS and (not args.config or "=" in args.config):  # (a documented CONFIG is not here to read)
        config_from_args(args, FLAG_VERBS[args.verb].flags)  # its flags and key=value make a valid config


@pytest.mark.parametrize("where,call", CALLS, ids=[w for w, _ in CALLS])
def test_documented_train_call_binds(where, call):
    node = ast.parse(call, mode="eval").body
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    bound = inspect.signature(dpokit.train).bind(*args, **kwargs)  # TypeError if the documented call cannot work
    overrides = bound.arguments.get("overrides")
    if overrides:
        load_config(None, overrides)
