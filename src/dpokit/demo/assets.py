"""`demo:` paths in a config name the embedded demo's model and data, built (once) on demand.

    model.name_or_path: demo:sentiment-sft   -> the cached SFT model of the demo's review language
    data.path:          demo:sentiment-pairs -> its training preference pairs (jsonl)
    data.eval_path:     demo:sentiment-eval  -> its held-out pairs
    data.retention_path: demo:sentiment-sft-text -> prompt/completion rows of the SFT model's own text
    data.sft_mix_path:   demo:sentiment-sft-mix  -> more such rows, to mix into DPO

so the shipped demo config runs through `dpokit train` exactly like any other,
offline, on a fresh machine. Where a list of prompts is taken (a pipeline's `prompts` and
`eval_prompts`), demo:openings-train, demo:openings-eval and demo:openings-all name the review
world's openings of that split (world.all_openings), nothing built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpokit.config import Config, load_config
from dpokit.config.paths import cache_home
from dpokit.demo import world

ASSET_KEYS = ("model.name_or_path", "data.path", "data.eval_path", "data.retention_path", "data.sft_mix_path")
PREFIX = "demo:"
ASSETS = (
    "sentiment-sft",
    "sentiment-pairs",
    "sentiment-eval",
    "sentiment-sft-text",
    "sentiment-sft-mix",
)  # built files
PROMPT_SETS = {"openings-train": "train", "openings-eval": "eval", "openings-all": "all"}  # name -> world split
N_TRAIN_PAIRS = 2000
N_EVAL_PAIRS = 200


def demo_paths(seed: int = 0) -> dict[str, str]:
    from dpokit.demo.sft import build_preference_data, build_sft_model, build_sft_text

    model = build_sft_model(cache_home(), seed=seed)
    train, held_out = build_preference_data(cache_home(), N_TRAIN_PAIRS, N_EVAL_PAIRS, seed=seed)
    retention, mix = build_sft_text(cache_home(), seed=seed)
    return dict(zip(ASSETS, (str(path) for path in (model, train, held_out, retention, mix))))


def resolve_demo_names(
    specs: dict[str, Any], error: type[Exception] = ValueError, prompt_sets: bool = False
) -> dict[str, Any]:
    """The one resolver of `demo:` names: {where: spec} with each demo: spec replaced by its built asset's path, or,
    where the places take a list of prompts (prompt_sets), by a prompt set's prompts (world.all_openings, in order).

    Other specs pass through; the assets are built (or found) once, and only when a demo: asset is named.
    `where` is named in the error for an unknown name (a config key, or "" for a bare name).
    """
    known = ASSETS + (tuple(PROMPT_SETS) if prompt_sets else ())
    wanted = {
        where: spec[len(PREFIX) :] for where, spec in specs.items() if isinstance(spec, str) and spec.startswith(PREFIX)
    }
    for where, name in wanted.items():
        if name not in known:
            raise error(
                f"unknown demo asset {specs[where]!r}{f' in {where}' if where else ''}; "
                f"known: {', '.join(PREFIX + k for k in known)}"
            )
    paths = demo_paths() if any(name in ASSETS for name in wanted.values()) else {}
    resolved = dict(specs)
    for where, name in wanted.items():
        resolved[where] = paths[name] if name in ASSETS else world.all_openings(PROMPT_SETS[name])
    return resolved


def resolve_demo_name(spec: str, error: type[Exception] = ValueError, prompt_sets: bool = False) -> Any:
    """One `demo:` name -> its built asset's path (or a prompt set's prompts); a folder, hub id or file as given."""
    return resolve_demo_names({"": spec}, error, prompt_sets)[""]


def resolve_demo_assets(cfg: Config) -> Config:
    """Replace demo: paths in the config by the built assets' real paths (other configs pass through)."""
    keys = [key.split(".") for key in ASSET_KEYS]
    resolved = resolve_demo_names({f"{s}.{n}": getattr(getattr(cfg, s), n) for s, n in keys})
    for section, name in keys:
        if resolved[f"{section}.{name}"] != getattr(getattr(cfg, section), name):
            value = resolved[f"{section}.{name}"]
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


def load_resolved_config(config, overrides=None) -> Config:
    """load_config, then every demo: path resolved: what each verb that trains or scores on a Config loads
    (`dpokit train`, `dpokit precompute`), so the assets are resolved once, here."""
    return resolve_demo_assets(load_config(config, overrides))
