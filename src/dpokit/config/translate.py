"""Configs users bring: an Axolotl DPO YAML, or TRL DPOConfig arguments, as a dpokit config (`dpokit config --from`).

Every key of the foreign file ends up in one of two places: a dpokit setting (the output names the key it came
from, and says how the meaning differs where it does) or the output's `# not translated:` block with its value and
why. Nothing is dropped silently. Pure functions of the parsed mapping: the caller reads the file (config.loading,
with its size and alias limits) and checks the result with load_config.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

import yaml

from dpokit.config.errors import ConfigError, excerpt
from dpokit.config.schema import Config
from dpokit.config.translate_rules import AXOLOTL, LOSS_KEYS, SHARED, TRL, Setting, Skipped, loss_settings, none
from dpokit.config.translate_tables import AXOLOTL_RULES, TRL_RULES, axolotl_defaults


def foreign_kind(raw: dict) -> str | None:
    """AXOLOTL or TRL when the mapping looks like one, else None."""
    keys = set(raw)
    if "base_model" in keys and keys & {"rl", "datasets"}:
        return AXOLOTL
    # DPOConfig is a TrainingArguments: output_dir is its one required argument; these are its DPO and Trainer keys
    if "output_dir" in keys and keys & {
        "beta",
        "loss_type",
        "rpo_alpha",
        "max_prompt_length",
        "max_length",
        "per_device_train_batch_size",
        "num_train_epochs",
        "learning_rate",
        "gradient_accumulation_steps",
        "model_name_or_path",
        "dataset_name",
    }:
        return TRL
    return None


# --- the translation and its YAML -----------------------------------------------------------------------------------


@dataclass
class Translation:
    kind: str  # AXOLOTL or TRL
    source: str  # the file, for the header
    settings: list[Setting]
    skipped: list[Skipped]
    values: dict[str, Any] = field(
        default_factory=dict
    )  # every foreign key's value, nested keys dotted (datasets[0].path)

    def nested(self) -> dict:
        """The settings as a config mapping, what load_config reads."""
        out: dict = {}
        for s in self.settings:
            *parents, last = s.key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = s.value
        return out

    def accounted(self) -> set[str]:
        """Every foreign key the translation read (a setting came from it, or it is listed as not translated), and the
        top-level key above each nested one (datasets above datasets[0].path)."""
        keys = {k for s in self.settings for k in s.sources} | {s.key for s in self.skipped}
        return keys | {re.split(r"[.\[]", k)[0] for k in keys}

    def to_yaml(self) -> str:
        lines = [
            f"# dpokit config translated from {self.source} ({self.kind}) by `dpokit config --from`.",
            "# Each setting names the key it came from; a note above one says where the meaning differs.",
            '# `dpokit config THIS_FILE` prints every key; docs/config.md, "Coming from Axolotl or TRL".',
        ]
        section = None
        for s in self.settings:
            head, _, name = s.key.rpartition(".")
            if head != section:
                section = head
                lines += [f"{head}:"] if head else []
            indent = "  " if head else ""
            if not s.sources:  # a default of the foreign tool's, written out
                lines.append(f"{indent}{name}: {flow(s.value)}  # not in the file: {s.note}")
                continue
            wrap = textwrap.wrap(
                s.note, 116 - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "
            )
            origin = ", ".join(self._origin(k, s.value) for k in s.sources)
            lines += wrap + [f"{indent}{name}: {flow(s.value)}  # {origin}"]
        if self.skipped:
            lines.append("# not translated:")
            for s in self.skipped:
                lines += textwrap.wrap(
                    f"{s.key}: {flow(s.value, 80)}  -- {s.why}",
                    112,
                    initial_indent="#   ",
                    subsequent_indent="#       ",
                )
        return "\n".join(line.rstrip() for line in lines) + "\n"

    def _origin(self, key: str, value: Any) -> str:
        """The foreign key, and its value where the dpokit value is written differently."""
        written = flow(self.values.get(key), 60)
        return key if written == flow(value, 60) else f"{key}: {written}"


def flow(value: Any, limit: int = 0) -> str:
    """`value` as one line of YAML (lists and mappings in flow style); with `limit`, cut to about that length."""
    text = (
        yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...").strip()
    )
    if "\n" in text:  # a string with line breaks: JSON writes it on one line, and JSON is YAML
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if not limit or len(text) <= limit else excerpt(value, limit)


def flatten(raw: dict) -> dict[str, Any]:
    """Top-level values, and one entry per key of a nested mapping (trl.beta) or list of them (datasets[0].path)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        out[str(key)] = value
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            for i, item in enumerate(value):
                out[f"{key}[{i}]"] = item
                if isinstance(item, dict):
                    out.update({f"{key}[{i}].{k}": v for k, v in item.items()})
    return out


def translate(raw: dict, source: str) -> Translation:
    """Translate the parsed foreign config `raw` (read from `source`); ConfigError when it is neither format."""
    kind = foreign_kind(raw)
    if kind is None:
        raise ConfigError(
            f"{source} is neither an Axolotl DPO config (base_model with rl or datasets) nor TRL DPOConfig "
            "arguments (output_dir with beta, loss_type, learning_rate, ...)"
        )
    rules = AXOLOTL_RULES if kind == AXOLOTL else TRL_RULES
    outcome = loss_settings(raw, kind)
    for key, value in raw.items():
        if key not in LOSS_KEYS[kind] and value is not None:  # an empty key is unset, for Axolotl and TRL alike
            rule = rules.get(key) or SHARED.get(key) or none("no dpokit equivalent")
            outcome += rule(str(key), value, raw)
    if kind == AXOLOTL:
        outcome += axolotl_defaults(raw)
    read = Translation(
        kind, source, [o for o in outcome if isinstance(o, Setting)], [o for o in outcome if isinstance(o, Skipped)]
    ).accounted()
    # what no rule read (an empty key, say) is listed too: no key leaves the translation unsaid
    outcome += [
        Skipped(str(k), v, "empty: unset" if v is None else "no dpokit equivalent")
        for k, v in raw.items()
        if str(k) not in read
    ]
    settings = merge([o for o in outcome if isinstance(o, Setting)])
    return Translation(kind, source, settings, [o for o in outcome if isinstance(o, Skipped)], flatten(raw))


ORDER = [f.name for f in dataclasses.fields(Config)]


def merge(settings: list[Setting]) -> list[Setting]:
    """One setting per dpokit key, in the config's section order; two keys giving it different values is an error."""
    by_key: dict[str, Setting] = {}
    for s in settings:
        if s.key not in by_key:
            by_key[s.key] = s
            continue
        kept = by_key[s.key]
        if kept.value != s.value:
            raise ConfigError(
                f"{' and '.join(kept.sources + s.sources)} give {s.key} two values ({flow(kept.value, 60)}, "
                f"{flow(s.value, 60)}): keep one of them"
            )
        kept.sources += tuple(k for k in s.sources if k not in kept.sources)
        kept.note = kept.note or s.note
    return sorted(
        by_key.values(), key=lambda s: ORDER.index(s.key.split(".")[0]) if s.key.split(".")[0] in ORDER else len(ORDER)
    )
