"""`demo:` paths in a config name the embedded demo's model and data, built (once) on demand.

    model.name_or_path: demo:sentiment-sft   -> the cached SFT model of the demo's review language
    data.path:          demo:sentiment-pairs -> its training preference pairs (jsonl)
    data.eval_path:     demo:sentiment-eval  -> its held-out pairs
    data.retention_path: demo:sentiment-sft-text -> prompt/completion rows of the SFT model's own text
    data.sft_mix_path:   demo:sentiment-sft-mix  -> more such rows, to mix into DPO

so the shipped demo config runs through `dpokit train` exactly like any other,
offline, on a fresh machine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpokit.config import Config, load_config
from dpokit.config.paths import cache_home

ASSET_KEYS = ("model.name_or_path", "data.path", "data.eval_path", "data.retention_path", "data.sft_mix_path")
PREFIX = "demo:"
N_TRAIN_PAIRS = 2000
N_EVAL_PAIRS = 200


def demo_paths(seed: int = 0) -> dict[str, str]:
    from dpokit.demo.sft import build_preference_data, build_sft_model, build_sft_text

    model = build_sft_model(cache_home(), seed=seed)
    train, held_out = build_preference_data(cache_home(), N_TRAIN_PAIRS, N_EVAL_PAIRS, seed=seed)
    retention, mix = build_sft_text(cache_home(), seed=seed)
    return {"sentiment-sft": str(model), "sentiment-pairs": str(train), "sentiment-eval": str(held_out),
            "sentiment-sft-text": str(retention), "sentiment-sft-mix": str(mix)}


def resolve_demo_names(specs: dict[str, Any], error: type[Exception] = ValueError) -> dict[str, Any]:
    """The one resolver of `demo:` names: {where: spec} with each demo: spec replaced by its built asset's path.

    Other specs pass through; the assets are built (or found) once, and only when a demo: name is there.
    `where` is named in the error for an unknown name (a config key, or "" for a bare name).
    """
    wanted = [where for where, spec in specs.items() if isinstance(spec, str) and spec.startswith(PREFIX)]
    if not wanted:
        return dict(specs)
    paths, resolved = demo_paths(), dict(specs)
    for where in wanted:
        key = specs[where][len(PREFIX) :]
        if key not in paths:
            raise error(f"unknown demo asset {specs[where]!r}{f' in {where}' if where else ''}; "
                        f"known: {', '.join(PREFIX + k for k in paths)}")
        resolved[where] = paths[key]
    return resolved


def resolve_demo_name(spec: str, error: type[Exception] = ValueError) -> str:
    """One `demo:` name -> its built asset's path; a folder, hub id or file as given."""
    return resolve_demo_names({"": spec}, error)[""]


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
