"""Building a config: defaults, then a YAML file / dict / Config, then key=value overrides; strict keys and types.

One machinery for every schema (Config, PipelineConfig): unknown keys and wrong types are errors
naming the dotted key with the closest valid one; YAML is read with limits on size and aliases.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from dpokit.config.errors import ConfigError, excerpt
from dpokit.config.names import suggest_key
from dpokit.config.online import PipelineConfig
from dpokit.config.paths import check_paths_from
from dpokit.config.schema import Config
from dpokit.config.translate import foreign_kind
from dpokit.config.typed import build_dataclass
from dpokit.config.validate import validate
from dpokit.inputs import KINDS, InputError, read_text
from dpokit.inputs.catalog import check_config_paths


def shipped_config(name: str, folder: str = "") -> Path | None:
    """A config shipped with dpokit: configs/[folder/]NAME.yaml (e.g. `demo`, or `pipeline_demo` in pipelines)."""
    candidate = resources.files("dpokit").joinpath("configs", *([folder] if folder else []), f"{name}.yaml")
    return Path(str(candidate)) if candidate.is_file() else None


def resolve_config_path(arg: str, folder: str = "") -> str:
    """A YAML path as given, or the path of the shipped config of that name."""
    if Path(arg).exists() or arg.endswith((".yaml", ".yml")):
        return arg
    shipped = shipped_config(arg, folder)
    return str(shipped) if shipped else arg


def _sections(schema) -> tuple[str, ...]:
    """Top-level keys of a schema that hold a section of settings (dict-valued settings such as data.columns are plain values)."""
    hints = typing.get_type_hints(schema)
    return tuple(f.name for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name]))


SECTIONS = _sections(Config)
PIPELINE_SECTIONS = _sections(PipelineConfig)


def load_config(
    source: Union[str, Path, dict, Config, None] = None, overrides: Union[list[str], dict, None] = None
) -> Config:
    """Build a Config from defaults, then a YAML file / dict / Config, then overrides.

    overrides: ["a.b=value", ...] (command line; a ("a.b", value) pair in the list is taken as typed) or
    {"a.b": value} (Python).
    """
    return _load_train_config(source, overrides, prefix="")


def load_pipeline_config(
    source: Union[str, Path, dict, PipelineConfig, None], overrides: Union[list[str], dict, None] = None
) -> PipelineConfig:
    """A PipelineConfig from defaults, a YAML file / dict, then overrides, by the same rules as load_config.

    `train.loss.beta=0.2` reaches into the `train:` section (a dpokit train config), which is then
    checked as a Config.
    """
    merged = _defaults_and(PipelineConfig, source)
    items = _parse_overrides(overrides)
    if isinstance(merged["train"], str) and any(key.startswith("train.") for key, _ in items):
        # a train config named by path or shipped name: read it, so the overrides have a mapping to go into
        merged["train"] = _read_yaml(Path(resolve_config_path(merged["train"])))
    for key, value in items:
        _set_dotted(merged, key, value, PIPELINE_SECTIONS)
    cfg = build_dataclass(PipelineConfig, merged, prefix="")
    validate_pipeline(cfg)
    return cfg


def _load_train_config(source, overrides, prefix: str) -> Config:
    """load_config's work; prefix names where the config sits ("train." inside a pipeline) in error messages."""
    merged = _defaults_and(Config, source, prefix)
    for key, value in _parse_overrides(overrides):
        _set_dotted(merged, key, value, SECTIONS)
    cfg = build_dataclass(Config, merged, prefix=prefix)
    if isinstance(source, (str, Path)):
        check_paths_from(Path(source), cfg, prefix)
    try:
        validate(cfg)
    except ConfigError as e:
        if not prefix:
            raise
        # validate names keys from the train config's top; say where that config sits
        raise ConfigError(f"in {prefix.rstrip('.')!r} (a dpokit train config): {e}") from None
    check_config_paths(cfg, prefix)  # the input gateway on every data file it names, before any verb reads one
    return cfg


def _defaults_and(schema, source, prefix: str = "") -> dict:
    """The schema's defaults as a nested dict, with `source` (an instance, a dict, a YAML path or None) merged in."""
    if isinstance(source, schema):
        raw = dataclasses.asdict(source)
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)  # overrides go into nested mappings; the caller's stay as they were
    elif source is None:
        raw = {}
    elif isinstance(source, (str, Path)):
        raw = _read_yaml(Path(source))
    else:
        raise ConfigError(f"a config is a YAML path, a dict or a {schema.__name__}, got {type(source).__name__}")
    merged = dataclasses.asdict(schema())
    try:
        _merge(merged, raw, prefix, _sections(schema))
    except ConfigError:
        # an Axolotl or TRL config given as a dpokit one: name the command that translates it, not its first key
        kind = foreign_kind(raw) if schema is Config and isinstance(source, (str, Path)) else None
        if kind:
            raise ConfigError(
                f"{source} looks like {kind}; translate it with: dpokit config --from {source} > dpokit.yaml"
            ) from None
        raise
    return merged


def read_config_mapping(path: str | Path) -> dict:
    """A YAML (or JSON) config file's top-level mapping, read with the limits below; `dpokit config --from` reads one."""
    return _read_yaml(Path(path))


# A config file is a few KB of settings. These limits stop a "billion laughs" file (nested aliases
# that expand exponentially) before it is expanded, printed or copied: 2 KB of anchors can expand
# to gigabytes. Real configs use few aliases, if any, and stay far below both numbers.
MAX_CONFIG_BYTES = KINDS["config"].limit  # 1 MB, the gateway's limit for config files
MAX_YAML_NODES = 100_000  # scalars + collections after expanding every alias


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes in the document once every alias is expanded, counted without expanding it (stops past `limit`).

    Aliases are shared node objects in the composed graph, so each node's expanded size is computed
    once; a node that contains itself (a recursive alias) counts as unlimited.
    """
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in in_progress:
            return limit + 1
        in_progress.add(id(n))
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [part for pair in n.value for part in pair]
        else:
            children = []
        for child in children:
            total = min(limit + 1, total + size(child))
        in_progress.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def load_yaml_text(text: str, where: str):
    """yaml.safe_load(text), refused (ConfigError naming `where`) when its aliases expand past MAX_YAML_NODES."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None and _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(
            f"{where}: the YAML expands to more than {MAX_YAML_NODES} values once its aliases (*name) "
            "are expanded; a config needs far fewer: write the settings out without nested aliases"
        )
    return yaml.safe_load(text)


def _read_yaml(path: Path) -> dict:
    if not os.path.lexists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        # The input gateway: a regular file (not a FIFO or /dev/zero), at most MAX_CONFIG_BYTES.
        data = load_yaml_text(read_text(path, "config"), str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e)[:300]}") from None
    except InputError as e:
        raise ConfigError(str(e)) from None
    except (OSError, RecursionError, ValueError) as e:  # a folder, no permission, absurd nesting
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot read the config file: {type(e).__name__}: {str(e)[:300]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _parse_overrides(overrides) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        for key in overrides:
            if not isinstance(key, str):
                raise ConfigError(f"override keys are dotted names such as 'loss.beta', got {excerpt(key)}")
        return list(overrides.items())
    if isinstance(overrides, str):
        raise ConfigError(f"overrides are a list of key=value strings, got the single string {excerpt(overrides)}")
    out = []
    for item in overrides:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(item)  # (key, value) already typed: a command-line flag that aliases the key (config/flags.py)
            continue
        if not isinstance(item, str):
            raise ConfigError(f"override {excerpt(item)} is not a key=value string (e.g. loss.beta=0.05)")
        if "=" not in item:
            raise ConfigError(f"override {excerpt(item)} is not of the form key=value (e.g. loss.beta=0.05)")
        key, text = item.split("=", 1)
        try:
            value = load_yaml_text(text, f"override {key.strip()!r}") if text != "" else ""
        except (yaml.YAMLError, ValueError, RecursionError):
            value = text
        out.append((key.strip(), value))
    return out


def _merge(base: dict, update: dict, prefix: str, sections: tuple[str, ...]) -> None:
    for key, value in update.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"config keys are names, got {excerpt(key)} ({type(key).__name__}) in {prefix.rstrip('.') or 'the top level'}"
            )
        full = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(
                f"unknown config key {excerpt(full)}" + suggest_key(full[:200], [f"{prefix}{k}" for k in base])
            )
        if key in sections and dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)  # a section given as its dataclass (Python callers)
        if key in sections and isinstance(value, dict):
            _merge(base[key], value, f"{full}.", ())
        else:
            base[key] = value


def _set_dotted(merged: dict, key: str, value: Any, sections: tuple[str, ...]) -> None:
    parts = key.split(".")
    if key in sections:
        raise ConfigError(
            f"config key {key!r} is a section; set one of its keys, e.g. {_all_keys({key: merged[key]}, sections)[0]}=..."
        )
    valid = _all_keys(merged, sections)
    if key not in valid:
        # A key below a mapping-valued setting sets one entry of it: data.columns.prompt=question, or in
        # a pipeline train.loss.beta=0.2 (its train config is a mapping; missing levels are made).
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in valid and isinstance(_get_dotted(merged, head), dict):
                node = _get_dotted(merged, head)
                for part in parts[n:-1]:
                    node = node.setdefault(part, {})
                    if not isinstance(node, dict):
                        raise ConfigError(f"config key {excerpt(key)}: {head}...{part} is a value, not a mapping")
                node[parts[-1]] = value
                return
        raise ConfigError(f"unknown config key {excerpt(key)}" + suggest_key(key[:200], valid))
    node = merged
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _get_dotted(merged: dict, key: str):
    node = merged
    for part in key.split("."):
        node = node[part]
    return node


def _all_keys(merged: dict, sections: tuple[str, ...]) -> list[str]:
    keys = []
    for k, v in merged.items():
        if k in sections:
            keys += [f"{k}.{sub}" for sub in v]
        else:
            keys.append(k)
    return keys


def validate_pipeline(cfg: PipelineConfig) -> None:
    """The sections check themselves as they are built; here the keys that depend on each other, and `train`."""
    if cfg.reference not in ("fixed", "refresh"):
        raise ConfigError(f"config key 'reference' must be fixed or refresh, got {cfg.reference!r}")
    if cfg.rounds < 1:
        raise ConfigError(f"config key 'rounds' must be >= 1, got {cfg.rounds}")
    if not cfg.policy:
        raise ConfigError("config key 'policy' (the SFT model) is required")
    if not cfg.prompts:
        raise ConfigError("config key 'prompts' is required")
    if cfg.scorer is None:
        raise ConfigError("config key 'scorer' is required (e.g. dpokit.demo.world:sentiment)")
    if cfg.prompts_per_round is not None and cfg.prompts_per_round < 1:
        raise ConfigError(
            f"config key 'prompts_per_round' must be >= 1 or null (all prompts), got {cfg.prompts_per_round}"
        )
    if cfg.eval.suites:  # the per-round eval does not run them: say so rather than ignore the key
        raise ConfigError(
            "config key 'eval.suites' is for `dpokit eval --suite ...` only; a pipeline's per-round eval does "
            "not run suites (run dpokit eval on the final policy)"
        )
    for key in (
        "baseline",
        "local_judge",
    ):  # the per-round eval's baseline is the SFT model's samples, judged by the scorer
        if getattr(cfg.eval, key) is not None:
            raise ConfigError(
                f"config key 'eval.{key}' is for `dpokit eval` only; a pipeline compares every round with "
                "its SFT model, by its scorer"
            )
    # The train section is a whole dpokit train config: checked now, not at the end of round 1's sampling.
    source = cfg.train if isinstance(cfg.train, dict) else resolve_config_path(cfg.train)
    _load_train_config(source, None, prefix="train.")
