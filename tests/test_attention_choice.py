"""`speed.attention`: which backend the fast step runs when model.attn_implementation is unset (docs/performance.md)."""

from __future__ import annotations

import pytest
import torch

from dpokit.config import ConfigError, SpeedConfig, load_config
from dpokit.data.packing import Layout
from dpokit.packed_attention import auto_attention, fast_attention
from dpokit.steps import FastPairedStep, step_for
from dpokit.steps.token_scores import compute_dtype, layout_for
from test_flash_varlen_inputs import PAIRS

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    "cuda, flash_attn, dtype, expected",
    [
        (False, False, FP32, "sdpa"),
        (False, True, BF16, "sdpa"),
        (False, False, BF16, "sdpa"),  # CPU: per-unit sdpa, always
        (True, True, BF16, "flash"),
        (True, True, FP16, "flash"),  # the varlen kernel, one call per layer
        (True, True, FP32, "sdpa"),
        (True, True, None, "sdpa"),  # flash-attn has no float32 kernels; dtype unknown ("auto")
        (True, False, BF16, "sdpa"),
        (True, False, FP32, "sdpa"),  # no flash-attn installed
    ],
)
def test_auto_decision_table(cuda, flash_attn, dtype, expected):
    assert auto_attention(cuda, flash_attn, dtype) == expected


def test_compute_dtype_from_model_dtype_and_mixed_precision():
    assert compute_dtype(load_config(None, {})) == FP32
    assert compute_dtype(load_config(None, {"model.dtype": "bfloat16"})) == BF16
    assert compute_dtype(load_config(None, {"train.mixed_precision": "bf16"})) == BF16
    assert compute_dtype(load_config(None, {"train.mixed_precision": "fp16"})) == FP16
    assert compute_dtype(load_config(None, {"model.dtype": "auto"})) is None


def test_the_user_backend_wins_and_explicit_choices_map_to_transformers_names():
    assert fast_attention("flex", "eager", BF16) == "eager"  # model.attn_implementation is the user's choice
    assert fast_attention("sdpa", None, BF16) == "sdpa"
    assert fast_attention("flex", None, FP32) == "flex_attention"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rows of the table")
def test_on_cpu_auto_is_todays_sdpa_layout_and_flash_is_refused():
    step = step_for(load_config(None, {}))
    assert isinstance(step, FastPairedStep)
    assert step.collate(PAIRS, 0)["input_ids"].shape == (
        1,
        18,
    )  # one row, prompts shared: 3 + 2 + 3, 1 + 1 + 2, 2 + 3 + 1
    assert layout_for(SpeedConfig(), fast_attention("auto", None, BF16)) == Layout(single_row=True)
    with pytest.raises(ValueError, match="speed.attention=flash needs a CUDA device"):
        step_for(load_config(None, {"speed.attention": "flash"}))


def test_speed_attention_is_validated():
    for value in ("auto", "sdpa", "flex", "flash"):
        assert load_config(None, {"speed.attention": value}).speed.attention == value
    with pytest.raises(ConfigError, match="'speed.attention' must be one of auto, sdpa, flex, flash; got 'flash2'"):
        load_config(None, {"speed.attention": "flash2"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="FlexAttention trains on a GPU")
@pytest.mark.parametrize("choice", [{"speed.attention": "flex"}, {"model.attn_implementation": "flex_attention"}])
def test_flex_attention_on_cpu_is_refused_in_one_line_before_any_compute(tmp_path, choice):
    """torch has no FlexAttention backward on CPU: the run used to die in its first backward with a torch traceback."""
    import dpokit
    from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(4, seed=0))
    cfg = {
        "model.name_or_path": str(tiny_model_dir()),
        "data.path": str(data),
        "train.max_steps": 1,
        "out_dir": str(tmp_path / "run"),
        **choice,
    }
    with pytest.raises(ConfigError, match="FlexAttention has no backward on CPU") as error:
        dpokit.train(None, cfg)
    assert "sdpa" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before the run directory, the data and the model
