"""dpokit sample, score, pair and eval read the one Config: a YAML file, key=value overrides, and their flags,
which are aliases of config keys built from the dataclasses (config/flags.py), so a flag cannot drift from its key.
Every verb is registered one way (commands.verbs())."""

from __future__ import annotations

import argparse
import json
import typing

import pytest
import yaml

from dpokit.cli import build_parser, main, parse_command_line
from dpokit.commands import verbs
from dpokit.config import Config, ConfigError, load_config
from dpokit.config.flags import config_from_args, get_key, key_field
from dpokit.online.loading import ModelTrust

FLAG_VERBS = {v.name: v for v in verbs() if v.flags}


def _subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _cfg(argv: list[str]) -> Config:
    args = parse_command_line(argv)
    return config_from_args(args, FLAG_VERBS[argv[0]].flags)


def test_the_online_verbs_take_flags():
    assert set(FLAG_VERBS) == {"sample", "score", "pair", "eval"}


@pytest.mark.parametrize("verb", sorted(FLAG_VERBS))
def test_every_flag_is_a_real_key_and_its_default_is_the_dataclass_one(verb):
    parser = _subparser(verb)
    actions = {a.dest: a for a in parser._actions}
    unset = _cfg([verb])
    for flag in FLAG_VERBS[verb].flags:
        default, _ = key_field(flag.key)  # ConfigError for a key Config does not have
        assert get_key(Config(), flag.key) == default
        action = actions[flag.attr]
        assert action.default is argparse.SUPPRESS  # an unset flag leaves the config's value (YAML, key=value) alone
        assert f"config key {flag.key}" in action.help
        if "(required)" not in action.help:
            shown = "none" if default in (None, "") else "[]" if default == [] else str(default)
            assert f"default {shown})" in action.help, action.help
        assert get_key(unset, flag.key) == default  # nothing given: the dataclass default


def test_a_flag_naming_no_key_is_refused():
    with pytest.raises(ConfigError):
        key_field("sampling.no_such_key")
    with pytest.raises(ConfigError):
        key_field("nosection.num_samples")


def _other_value(flag):
    """A valid value of the flag's key other than its default, as text for the command line."""
    default, tp = key_field(flag.key)
    choices = flag.choices() if callable(flag.choices) else flag.choices
    if choices:
        return next(c for c in choices if c not in (default if isinstance(default, list) else [default]))
    kinds = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    kind = typing.get_args(kinds[0])[0] if typing.get_origin(kinds[0]) is list else kinds[0]
    if kind is bool:
        return True
    if kind is int:
        return (default or 1) + 1
    if kind is float:
        return 1.5 if flag.key == "pairing.max_length_ratio" else 0.5
    return f"x-{flag.attr}"


@pytest.mark.parametrize("verb", sorted(FLAG_VERBS))
def test_each_flag_sets_its_key_as_key_value_does(verb):
    for flag in FLAG_VERBS[verb].flags:
        value = _other_value(flag)
        argv = [verb, flag.names[-1]] + ([] if value is True else [str(value)])
        by_flag = _cfg(argv)
        expected = [value] if flag.repeat else value
        assert get_key(by_flag, flag.key) == expected, (flag.names, get_key(by_flag, flag.key))
        by_key = load_config(None, [f"{flag.key}={json.dumps(expected) if flag.repeat else value}"])
        assert get_key(by_key, flag.key) == expected


def test_yaml_then_flags_then_key_value(tmp_path):
    config = tmp_path / "sample.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "m"},
                "sampling": {"num_samples": 3, "seed": 9},
                "io": {"prompts": "p.jsonl", "out": "o.jsonl"},
            }
        )
    )
    assert _cfg(["sample", str(config)]).sampling.num_samples == 3
    cfg = _cfg(["sample", str(config), "-n", "5"])
    assert (cfg.sampling.num_samples, cfg.sampling.seed, cfg.io.prompts) == (5, 9, "p.jsonl")
    assert _cfg(["sample", str(config), "-n", "5", "sampling.num_samples=7"]).sampling.num_samples == 7
    assert _cfg(["sample", "sampling.num_samples=6"]).sampling.num_samples == 6  # key=value first: no CONFIG


def test_unknown_keys_and_bad_values_are_errors_as_for_train(tmp_path, capsys):
    assert main(["sample", "sampling.num_sample=8", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'sampling.num_sample'" in err and "sampling.num_samples" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("pairing:\n  stratgy: all_pairs\n")
    assert main(["pair", str(bad), "--in", "a", "--out", "b"]) == 2
    assert "unknown config key 'pairing.stratgy'" in capsys.readouterr().err
    assert main(["pair", "--in", "a", "--out", "b", "pairing.strategy=best"]) == 2
    assert "pairing.strategy" in capsys.readouterr().err
    assert main(["score", "--out", "o.jsonl", "--scorer", "m:f"]) == 2  # what the verb cannot run without
    assert "give --in or io.input=" in capsys.readouterr().err


def test_one_trust_switch(tmp_path):
    by_flag = _cfg(["eval", "--trust-remote-code", "--allow-pickle"])
    by_key = _cfg(["eval", "model.trust_remote_code=true", "model.allow_pickle=true"])
    assert ModelTrust.of(by_flag.model) == ModelTrust.of(by_key.model) == ModelTrust(True, True)
    config = tmp_path / "trust.yaml"
    config.write_text("model:\n  trust_remote_code: true\n")
    assert ModelTrust.of(_cfg(["score", str(config)]).model).trust_remote_code
    assert ModelTrust.of(_cfg(["sample"]).model) == ModelTrust()


def test_every_verb_is_registered_from_the_one_table():
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(action.choices) == [v.name for v in verbs()]
    from dpokit.online import evaluation, pairing, pipeline, sampling, scoring

    for module in (sampling, scoring, pairing, pipeline, evaluation):
        assert not hasattr(module, "add_cli")  # the second convention is gone
        assert module.VERB in verbs()


def test_a_pipeline_refuses_the_eval_verbs_own_keys():
    from dpokit.config import load_pipeline_config

    base = {"policy": "p", "prompts": ["a"], "scorer": "m:f"}
    with pytest.raises(ConfigError, match="'eval.baseline' is for `dpokit eval` only"):
        load_pipeline_config(base, ["eval.baseline=other"])


def _prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("the film was", "it is", "my day")))
    return path


def test_sample_score_pair_from_yaml_write_what_the_flags_write(tmp_path, capsys):
    from tiny_assets import tiny_model_dir

    prompts, model = _prompts(tmp_path), str(tiny_model_dir())
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(completion):\n    return len(completion.split())\n")
    by_flags = tmp_path / "flags"
    by_flags.mkdir()
    assert (
        main(
            [
                "sample",
                "--model",
                model,
                "--prompts",
                str(prompts),
                "--out",
                str(by_flags / "s.jsonl"),
                "-n",
                "3",
                "--max-new-tokens",
                "6",
                "--backend",
                "hf",
                "--seed",
                "4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "score",
                "--in",
                str(by_flags / "s.jsonl"),
                "--out",
                str(by_flags / "sc.jsonl"),
                "--scorer",
                f"{rewards}:length",
            ]
        )
        == 0
    )
    assert (
        main(
            ["pair", "--in", str(by_flags / "sc.jsonl"), "--out", str(by_flags / "p.jsonl"), "--strategy", "all_pairs"]
        )
        == 0
    )
    by_yaml = tmp_path / "yaml"
    by_yaml.mkdir()
    config = tmp_path / "online.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": model},
                "sampling": {"num_samples": 3, "max_new_tokens": 6, "backend": "hf", "seed": 4},
                "scoring": {"scorer": f"{rewards}:length"},
                "pairing": {"strategy": "all_pairs"},
                "io": {"prompts": str(prompts)},
            }
        )
    )
    assert main(["sample", str(config), f"io.out={by_yaml / 's.jsonl'}"]) == 0
    assert main(["score", str(config), f"io.input={by_yaml / 's.jsonl'}", f"io.out={by_yaml / 'sc.jsonl'}"]) == 0
    assert main(["pair", str(config), f"io.input={by_yaml / 'sc.jsonl'}", f"io.out={by_yaml / 'p.jsonl'}"]) == 0
    capsys.readouterr()
    for name in ("s.jsonl", "sc.jsonl", "p.jsonl"):
        assert (by_yaml / name).read_text() == (by_flags / name).read_text() != ""
    assert json.loads((by_yaml / "p.jsonl.summary.json").read_text())["config"]["strategy"] == "all_pairs"
