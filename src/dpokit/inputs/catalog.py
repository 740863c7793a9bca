"""Every input of every verb: the gateway's own list, from which docs/robustness.md is generated and tested.

An entry says which verb reads it, how the user names it (a CLI option, a positional, a config key,
or a path inside a data row), which gateway kind limits it, and what else its value may be (a hub
id, a folder, `module:function`). The CLI checks the options listed here before a verb starts
(`check_cli_inputs`), the config loader checks the config keys (`check_config_paths`), and
tests/test_robustness.py runs every entry against a device, a FIFO, a symlink to a device, a sparse
10 GB file, an unreadable file and a path outside the data folder. A new file option is added here,
or the test that compares this list with the CLI's parsers fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from dpokit.inputs.gateway import check_file


@dataclass(frozen=True)
class Input:
    verbs: tuple[str, ...]  # the verbs that read it ("rows": paths inside data rows, whatever the verb)
    name: str  # how the user names it: "--in", "CONFIG", "data.path", "images (in a row)"
    kind: str  # the gateway kind (KINDS): its size limit
    reader: str  # the code path that reads it, one name per reader (tests/test_robustness.py runs each)
    dest: str | None = None  # the argparse dest, for options the CLI checks before the verb starts
    also: str = ""  # what else the value may be, besides a file


_TRAINING = ("train", "sft", "precompute", "plan", "config", "doctor")

INPUTS: tuple[Input, ...] = (
    Input(
        _TRAINING[:5] + ("sample", "score", "pair", "eval"),
        "CONFIG",
        "config",
        "config",
        dest="config",
        also="a shipped config name (demo)",
    ),
    Input(("doctor",), "--config", "config", "config", dest="config", also="a shipped config name"),
    Input(("pipeline",), "CONFIG", "config", "pipeline_config", dest="config", also="a shipped pipeline name"),
    Input(("config",), "--from", "config", "config_from", dest="from_file", also="an Axolotl or TRL config"),
    Input(_TRAINING, "data.path", "data", "rows", also="a datasets folder or a hub id"),
    Input(_TRAINING, "data.eval_path", "data", "rows", also="a datasets folder or a hub id"),
    Input(_TRAINING, "data.retention_path", "data", "rows", also="a datasets folder or a hub id"),
    Input(_TRAINING, "data.sft_mix_path", "data", "rows", also="a datasets folder or a hub id"),
    Input(("doctor",), "DATA", "data", "rows", dest="data", also="a datasets folder or a hub id"),
    Input(("pipeline",), "prompts (pipeline config)", "data", "rows", also="a list, demo:openings-train"),
    Input(("sample",), "--prompts", "data", "rows", dest="prompts", also="a datasets folder or a hub id"),
    Input(("sample",), "--out (resumed)", "samples", "samples", dest="out", also="a new file"),
    Input(("score",), "--in", "samples", "samples", dest="in_path"),
    Input(("score",), "--out (resumed)", "samples", "samples", dest="out", also="a new file"),
    Input(
        ("score", "eval"), "--scorer FILE.py:fn", "module", "scorer", dest="scorer", also="module:function, rm:MODEL"
    ),
    Input(("pair",), "--in", "samples", "samples", dest="in_path"),
    Input(("eval",), "--prompts", "data", "rows", dest="prompts", also="a datasets folder or a hub id"),
    Input(("eval",), "--pairs", "data", "rows", dest="pairs", also="a datasets folder or a hub id"),
    Input(("eval",), "--ifeval-prompts", "suite", "ifeval", dest="ifeval_prompts"),
    Input(("eval",), "--multiturn-questions", "suite", "multiturn", dest="multiturn_questions"),
    Input(("report",), "RUN_DIR files", "run", "run_dir", also="the run directory's own files"),
    Input(("rows",), "images (in a row)", "image", "image", also="bytes in the row"),
)


def local_path(value: Any, name: str) -> str | None:
    """The local file an option's value names, or None when it names something else (hub id, module, model)."""
    if not isinstance(value, str) or not value:
        return None
    if name.startswith("--scorer"):
        module, sep, _ = value.rpartition(":")
        if not sep or not module.endswith(".py"):
            return None  # module:function or rm:MODEL: imported or loaded, not read as a file
        value = module
    local = os.path.expanduser(value)
    return local if os.path.lexists(local) else None


def check_named_path(value: Any, entry: Input) -> None:
    """The gateway's checks on an existing local path an option or key names; folders pass where allowed."""
    local = local_path(value, entry.name)
    if local is None:
        return
    if "folder" in entry.also and os.path.isdir(local):
        return
    check_file(local, entry.kind, entry.name)


def check_cli_inputs(verb: str, args: Any) -> None:
    """Refuse, before the verb runs, any file option of `verb` that names a device, FIFO, huge file, ..."""
    for entry in INPUTS:
        if verb in entry.verbs and entry.dest:
            check_named_path(getattr(args, entry.dest, None), entry)


def check_config_paths(cfg: Any, prefix: str = "") -> None:
    """The gateway on every data file a training config names: a device, a FIFO or an over-limit file fails
    when the config is loaded, in one line naming the key, before any verb reads it or creates out_dir."""
    for entry in INPUTS:
        if entry.name.startswith("data."):
            section, _, key = entry.name.partition(".")
            check_named_path(getattr(getattr(cfg, section), key), replace(entry, name=prefix + entry.name))
