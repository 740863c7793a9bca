"""The flash-attention varlen inputs, as exact tensors (no flash kernel needed).

For attn_implementation="flash_attention_2" the fast step lays every sequence of the micro-batch
into one row without prefix sharing, passes no mask and restarts position_ids at 0 for each
sequence; transformers' flash path then derives cu_seqlens and max_length from those position ids
(`prepare_fa_kwargs_from_position_ids`, transformers 5.x) for the varlen kernel.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from dpokit.config import SpeedConfig
from dpokit.data.packing import Layout, collate_packed
from dpokit.data.tokenization import TokenizedPair
from dpokit.packed_attention import attention_inputs
from dpokit.steps import FastPairedStep
from dpokit.steps.token_scores import layout_for

FLASH = SimpleNamespace(_attn_implementation="flash_attention_2")
PAIRS = [
    TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12]),
    TokenizedPair([13], [14], [15, 16]),
    TokenizedPair([17, 18], [19, 20, 21], [22]),
]
# sequences in [chosen; rejected] order: prompt + chosen of pairs 0, 1, 2, then prompt + rejected of pairs 0, 1, 2
IDS = [5, 6, 7, 8, 9, 13, 14, 17, 18, 19, 20, 21, 5, 6, 7, 10, 11, 12, 13, 15, 16, 17, 18, 22]
POSITIONS = [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "speed", [SpeedConfig(), SpeedConfig(pack_length=8), SpeedConfig(packing=False, prefix_sharing=True)]
)
def test_flash_batch_is_one_row_with_restarting_positions_and_no_mask(speed):
    assert layout_for(speed, "flash_attention_2") == Layout(packing=True, prefix_sharing=False, single_row=True)
    batch = FastPairedStep(speed, "flash_attention_2").collate(PAIRS, 0)
    inputs = attention_inputs(FLASH, batch, torch.bfloat16)
    assert inputs.keys() == {"input_ids", "position_ids", "attention_mask"} and inputs["attention_mask"] is None
    assert torch.equal(inputs["input_ids"], torch.tensor([IDS]))
    assert torch.equal(inputs["position_ids"], torch.tensor([POSITIONS]))
    # the scored tokens: every completion token, predicted from the flat position before it
    assert batch["score_target"].tolist() == [8, 9, 14, 19, 20, 21, 10, 11, 12, 15, 16, 22]
    assert batch["score_pos"].tolist() == [2, 3, 5, 8, 9, 10, 14, 15, 16, 18, 19, 22]
    assert batch["score_seq"].tolist() == [0, 0, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5]


def test_transformers_derives_the_varlen_segments_from_those_positions():
    inputs = attention_inputs(
        FLASH, FastPairedStep(SpeedConfig(), "flash_attention_2").collate(PAIRS, 0), torch.bfloat16
    )
    assert _is_packed_sequence(inputs["position_ids"], batch_size=1)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(inputs["position_ids"])
    expected = torch.tensor([0, 5, 7, 12, 18, 21, 24], dtype=torch.int32)  # 5 + 2 + 5 tokens chosen, 6 + 3 + 3 rejected
    assert torch.equal(cu_q, expected) and torch.equal(cu_k, expected)
    assert int(max_q) == int(max_k) == 6


def test_prefix_shared_rows_are_refused_by_flash():
    batch = collate_packed(PAIRS, 0, Layout(prefix_sharing=True))
    with pytest.raises(ValueError, match="speed.prefix_sharing=false"):
        attention_inputs(FLASH, batch, torch.bfloat16)
