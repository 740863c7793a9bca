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


@pytest.mark.parametrize("cuda, flash_attn, dtype, expected", [
    (False, False, FP32, "sdpa"), (False, True, BF16, "sdpa"), (False, False, BF16, "sdpa"),  # CPU: per-unit sdpa, always
    (True, True, BF16, "flash"), (True, True, FP16, "flash"),  # the varlen kernel, one call per layer
    (True, True, FP32, "sdpa"), (True, True, None, "sdpa"),  # flash-attn has no float32 kernels; dtype unknown ("auto")
    (True, False, BF16, "sdpa"), (True, False, FP32, "sdpa"),  # no flash-attn installed
])
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
    assert step.collate(PAIRS, 0)["input_ids"].shape == (1, 18)  # one row, prompts shared: 3 + 2 + 3, 1 + 1 + 2, 2 + 3 + 1
    assert layout_for(SpeedConfig(), fast_attention("auto", None, BF16)) == Layout(single_row=True)
    with pytest.raises(ValueError, match="speed.attention=flash needs a CUDA device"):
        step_for(load_config(None, {"speed.attention": "flash"}))


def test_speed_attention_is_validated():
    for value in ("auto", "sdpa", "flex", "flash"):
        assert load_config(None, {"speed.attention": value}).speed.attention == value
    with pytest.raises(ConfigError, match="'speed.attention' must be one of auto, sdpa, flex, flash; got 'flash2'"):
        load_config(None, {"speed.attention": "flash2"})
