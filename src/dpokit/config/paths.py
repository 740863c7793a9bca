"""Relative paths in a config: the rule, and the run directory's resolved copy.

A relative path in a config, in a YAML file or a key=value override alike, is read from the current
directory, as Axolotl's, TRL's and LLaMA-Factory's CLIs read it: a key means the same wherever it was
given, and the shipped configs' `out_dir: runs/demo` means "under where you work", not inside the
installed package. The run directory's config.yaml holds the paths resolved (resolve_paths), so
`dpokit train RUN/config.yaml` repeats the run from any directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dpokit.config.errors import ConfigError
from dpokit.config.schema import Config

PATH_KEYS = (
    "model.name_or_path",
    "model.ref_name_or_path",
    "data.path",
    "data.eval_path",
    "data.retention_path",
    "data.sft_mix_path",
    "speed.ref_cache_dir",
    "train.resume",
    "out_dir",
)
_MADE_BY_THE_RUN = ("out_dir", "speed.ref_cache_dir")  # folders the run creates: resolved even before they exist


def cache_home() -> Path:
    """$DPOKIT_CACHE, else ~/.cache/dpokit: the one root of dpokit's caches (demo assets, reference log-probs, file hashes)."""
    return Path(os.environ.get("DPOKIT_CACHE") or Path.home() / ".cache" / "dpokit")


def resolve_paths(cfg: Config) -> Config:
    """`cfg` with every relative local path absolute (hub ids, `demo:` names and train.resume=auto|never as they are)."""
    for key in PATH_KEYS:
        value = _get(cfg, key)
        if _is_relative_path(key, value) and (key in _MADE_BY_THE_RUN or Path(value).expanduser().exists()):
            cfg = _with(cfg, key, os.path.abspath(Path(value).expanduser()))
    # data.image_root is a list of folders, each read from the current directory like the keys above
    roots = [os.path.abspath(Path(r).expanduser()) if isinstance(r, str) and r else r for r in cfg.data.image_root]
    return _with(cfg, "data.image_root", roots) if roots != list(cfg.data.image_root) else cfg


def check_paths_from(yaml_path: Path, cfg: Config, prefix: str = "") -> None:
    """A relative path missing from the current directory but present beside the YAML file: say which rule applies,
    rather than a bare "file not found" (`cd elsewhere && dpokit train dir/my.yaml` with `data.path: prefs.jsonl`)."""
    for key in PATH_KEYS:
        value = _get(cfg, key)
        if key in _MADE_BY_THE_RUN or not _is_relative_path(key, value) or Path(value).expanduser().exists():
            continue
        beside = os.path.abspath(yaml_path.parent / value)
        if os.path.exists(beside):
            raise ConfigError(
                f"{prefix}{key}={value!r} is not in the current directory ({os.getcwd()}), but {beside} exists: "
                "relative paths in a config are read from the current directory (docs/config.md); run from "
                f"{os.path.abspath(yaml_path.parent)} or give {prefix}{key}={beside}"
            )


def _is_relative_path(key: str, value) -> bool:
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute() or ":" in value.split("/")[0]:
        return False
    return not (key == "train.resume" and value in ("auto", "never"))


def _get(cfg: Config, key: str):
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section), name) if section else getattr(cfg, name)


def _with(cfg: Config, key: str, value) -> Config:
    section, _, name = key.rpartition(".")
    if not section:
        return dataclasses.replace(cfg, **{name: value})
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
