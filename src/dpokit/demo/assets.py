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

PREFIX = "demo:"
N_TRAIN_PAIRS = 2000
N_EVAL_PAIRS = 200


def demo_paths(seed: int = 0) -> dict[str, str]:
    from dpokit.demo.sft import build_preference_data, build_sft_model, build_sft_text, default_cache_dir

    model = build_sft_model(default_cache_dir(), seed=seed)
    train, held_out = build_preference_data(default_cache_dir(), N_TRAIN_PAIRS, N_EVAL_PAIRS, seed=seed)
    retention, mix = build_sft_text(default_cache_dir(), seed=seed)
    return {"sentiment-sft": str(model), "sentiment-pairs": str(train), "sentiment-eval": str(held_out),
            "sentiment-sft-text": str(retention), "sentiment-sft-mix": str(mix)}


def resolve_demo_assets(cfg):
    """Replace demo: paths in the config by the built assets' real paths (other configs pass through)."""
    fields = {"model": ("name_or_path",), "data": ("path", "eval_path", "retention_path", "sft_mix_path")}
    wanted = [
        (section, name)
        for section, names in fields.items()
        for name in names
        if str(getattr(getattr(cfg, section), name) or "").startswith(PREFIX)
    ]
    if not wanted:
        return cfg
    paths = demo_paths()
    for section, name in wanted:
        key = getattr(getattr(cfg, section), name)[len(PREFIX) :]
        if key not in paths:
            raise ValueError(f"unknown demo asset {PREFIX}{key!r} in {section}.{name}; known: {', '.join(PREFIX + k for k in paths)}")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: paths[key]})})
    return cfg
