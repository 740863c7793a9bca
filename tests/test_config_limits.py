"""Config reading that stays small and exact: alias bombs, short error excerpts, max_prompt_length's default, typos."""

import time

import pytest

from dpokit.config import ConfigError, load_config


def _bomb(levels: int = 9) -> str:
    """A list under train.seed whose item i holds 9 aliases of item i-1: 9**levels strings once expanded, < 1 KB."""
    items = [f"  - &b{i} [" + ", ".join([f"*b{i - 1}" if i else "lol"] * 9) + "]" for i in range(levels)]
    return "train:\n  seed:\n" + "\n".join(items) + "\n"


def test_an_alias_bomb_inside_a_valid_key_is_refused_fast_with_a_short_message(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    start = time.monotonic()
    with pytest.raises(ConfigError, match="aliases") as error:
        load_config(path)
    assert time.monotonic() - start < 5
    assert len(str(error.value)) < 400
    path.write_text(_bomb(levels=2))  # a few aliases are fine: the type error names the key, with an excerpt
    with pytest.raises(ConfigError, match="'train.seed' must be int"):
        load_config(path)


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("train:\n  seed: &s [*s]\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_config(path)


def test_errors_quote_only_an_excerpt_of_a_huge_value(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("train:\n  seed: [" + ", ".join(str(i) for i in range(50_000)) + "]\n")
    with pytest.raises(ConfigError, match="'train.seed' must be int") as error:
        load_config(path)
    assert len(str(error.value)) < 300 and "..." in str(error.value)
    with pytest.raises(ConfigError, match="'train.seed' must be int") as error:
        load_config(None, {"train.seed": "x" * 100_000})
    assert len(str(error.value)) < 300


def test_max_length_alone_gives_half_of_it_to_the_prompt():
    assert load_config(None, ["data.max_length=256"]).data.max_prompt_length == 128
    assert load_config().data.max_prompt_length == 512  # the documented default: half of 1024
    assert load_config(None, ["data.max_length=256", "data.max_prompt_length=200"]).data.max_prompt_length == 200
    with pytest.raises(ConfigError, match=r"max_prompt_length \(300\) must be smaller than data.max_length \(256\)"):
        load_config(None, ["data.max_length=256", "data.max_prompt_length=300"])


def test_the_saved_config_holds_the_resolved_int(tmp_path):
    cfg = load_config(None, ["data.max_length=64"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").data.max_prompt_length == 32


def test_a_misspelt_loss_type_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        load_config(None, ["loss.type=sigmod"])
    with pytest.raises(ConfigError, match="did you mean 'simpo'"):
        load_config(None, {"loss.type": ["sigmoid", "simpoo"], "loss.weights": [1.0, 1.0]})


def _float_keys() -> list[str]:
    """Every float setting of the config (float, Optional[float], list[float]), as dotted keys."""
    import dataclasses
    import typing

    from dpokit.config import Config

    def floats(tp) -> bool:
        return tp is float or any(floats(a) for a in typing.get_args(tp))

    keys = []
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.type) if dataclasses.is_dataclass(section.type) else {}
        keys += [f"{section.name}.{name}" for name, tp in hints.items() if floats(tp)]
    return keys


@pytest.mark.parametrize("key", _float_keys())
def test_every_float_key_refuses_nan_and_infinity_naming_the_key(key):
    value = "[.nan]" if key == "loss.weights" else None
    for text in [value] if value else [".nan", "nan", ".inf", "-.inf", "1e400"]:
        with pytest.raises(ConfigError, match=f"'{key}"):
            load_config(None, [f"{key}={text}"])


@pytest.mark.parametrize("beta", ["1e308", "101", "1e6"])
def test_beta_past_its_documented_range_is_refused(beta):
    with pytest.raises(ConfigError, match=r"'loss.beta' must be in \(0, 100\]"):
        load_config(None, [f"loss.beta={beta}"])
    assert load_config(None, ["loss.beta=100"]).loss.beta == 100.0  # SimPO's betas (2-10) and more are inside
