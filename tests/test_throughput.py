"""tokens_per_second, padding_fraction and mfu (training/throughput.py) on hand-checkable cases, and in a real run."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dpokit
from dpokit.data.collate import collate_pairs
from dpokit.data.packing import Layout, collate_packed
from dpokit.data.tokenization import TokenizedPair
from dpokit.steps.paired import pair_tokens
from dpokit.steps.sft_mix import MixedBatches
from dpokit.training.metrics import read_metrics
from dpokit.training.throughput import (
    ModelShape,
    Throughput,
    Work,
    batch_work,
    device_peak,
    measure_peak,
    mfu,
    model_shape,
    padding_fraction,
    table_peak,
    tokens_per_second,
)
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

# prompt 2 + chosen 1 = 3 tokens, prompt 2 + rejected 3 = 5 tokens: the pair's 8 tokens (TRL's num_tokens)
PAIR = TokenizedPair(prompt_ids=[5, 6], chosen_ids=[7], rejected_ids=[8, 9, 10])
SHORT = TokenizedPair(prompt_ids=[5], chosen_ids=[7], rejected_ids=[8])  # 2 + 2 tokens; 3 with a shared prompt


def _fraction(work: Work) -> float:
    return padding_fraction(work.padding, work.positions)


def test_padded_rows_of_3_and_5_tokens_compute_10_positions_2_of_them_padding():
    work = batch_work(collate_pairs([PAIR], pad_token_id=0), live_reference=False)
    assert (work.tokens, work.positions, work.padding) == (8, 10, 2)
    assert _fraction(work) == pytest.approx(0.2)
    assert work.tokens == pair_tokens(PAIR)


def test_packing_the_two_sequences_into_one_row_of_8_leaves_no_padding():
    work = batch_work(
        collate_packed([PAIR], 0, Layout(packing=True, prefix_sharing=False, pack_length=8)), live_reference=False
    )
    assert (work.tokens, work.positions, work.padding) == (8, 8, 0)
    # rows as long as the longer sequence (5): the 3-token one gets a row of its own, 2 positions of padding
    work = batch_work(collate_packed([PAIR], 0, Layout(packing=True, prefix_sharing=False)), live_reference=False)
    assert (work.positions, work.padding) == (10, 2)


def test_a_shared_prompt_is_computed_once_but_the_tokens_count_it_per_completion():
    work = batch_work(collate_packed([PAIR], 0, Layout(packing=True, prefix_sharing=True)), live_reference=False)
    assert (work.tokens, work.positions, work.padding) == (8, 6, 0)  # computed: 2 + 1 + 3
    assert work.squares == 3 * 3 + 5 * 5  # attention: the two sequences, prompt + completion each
    # one row per pair (no packing): units of 6 and 3 in rows of 6, 3 of the 12 positions padding
    work = batch_work(
        collate_packed([PAIR, SHORT], 0, Layout(packing=False, prefix_sharing=True)), live_reference=False
    )
    assert (work.tokens, work.positions, work.padding) == (12, 12, 3)
    assert _fraction(work) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "layout", [None, Layout(), Layout(prefix_sharing=False), Layout(packing=False), Layout(single_row=True)]
)
def test_every_layout_counts_the_tokens_num_tokens_counts(layout):
    pairs = [
        TokenizedPair(list(range(1, 2 + i % 4)), list(range(1, 1 + i % 3)), list(range(2, 4 + i % 5))) for i in range(9)
    ]
    batch = collate_pairs(pairs, 0) if layout is None else collate_packed(pairs, 0, layout)
    work = batch_work(batch, live_reference=False)
    assert work.tokens == sum(pair_tokens(p) for p in pairs)
    assert work.positions == batch["input_ids"].numel() and work.positions - work.padding <= work.tokens


def test_kto_kl_rows_are_computed_forward_only_and_not_counted_as_tokens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kl_mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": mask,
        "kl_input_ids": torch.zeros(2, 4, dtype=torch.long),
        "kl_attention_mask": kl_mask,
    }
    work = batch_work(batch, live_reference=True)
    assert (work.tokens, work.positions, work.padding) == (5, 16, 3 + 3)
    # forward only: the KL rows through the policy and the reference (2 x 5), the trained rows through the reference (5)
    assert (work.forward_tokens, work.forward_squares) == (2 * 5 + 5, 2 * (16 + 1) + (9 + 4))


def test_the_reference_counts_only_when_it_runs_and_dummies_and_mixed_sft_rows_as_they_train():
    batch = collate_pairs([PAIR], pad_token_id=0)
    cached = {**batch, "ref_logps": torch.zeros(2)}
    throughput = Throughput()
    throughput.add_step([batch, cached, batch], [False, False, True], live_reference=True)  # the third is a dummy
    assert (throughput.work.tokens, throughput.work.forward_tokens) == (16, 8)  # only the first ran the reference
    sft = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    throughput = Throughput()
    throughput.add_step([batch], [False], live_reference=True, mixed=MixedBatches([sft], [False], 1.0))
    assert (throughput.work.tokens, throughput.work.forward_tokens, throughput.work.positions) == (8 + 3, 8, 10 + 4)


def test_model_flops_are_6n_per_trained_token_2n_per_forward_token_plus_causal_attention():
    shape = ModelShape(params=1000, layers=2, width=8)
    work = Work(
        tokens=10, squares=50, forward_tokens=10, forward_squares=50
    )  # two sequences of 5, trained and run by the reference
    # forward: 2 x 1000 x 10 + 2 x 2 x 8 x 50 = 21,600; trained 3 x, reference 1 x
    assert shape.flops(work) == 4 * 21_600
    assert mfu(86_400, seconds=2.0, peak=86_400) == 0.5
    assert tokens_per_second(8, 2.0) == 4.0
    assert math.isnan(mfu(1.0, 0.0, 1.0)) and math.isnan(tokens_per_second(1, 0.0))


def test_n_is_every_parameter_but_the_input_embedding_and_a_tied_one_counts_once():
    for tied in (False, True):
        config = LlamaConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=tied,
        )
        # per layer q, k, v, o 4 x 16 x 16 + MLP 3 x 16 x 32 + 2 norms x 16 = 2592; final norm 16; the head 100 x 16
        assert model_shape(LlamaForCausalLM(config)) == ModelShape(params=2 * 2592 + 16 + 1600, layers=2, width=16)


def test_known_gpus_have_their_bf16_dense_peak_and_others_are_measured():
    assert table_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert table_peak("NVIDIA H100 PCIe") == 756e12
    assert table_peak("NVIDIA H200") == 989e12
    assert table_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert table_peak("NVIDIA L40S") == 362e12
    assert table_peak("NVIDIA L4") == 121e12
    assert table_peak("NVIDIA A10G") is None and table_peak("NVIDIA GeForce RTX 4090") is None
    assert measure_peak(torch.device("cpu"), torch.float32, 64) > 0
    peak, source = device_peak(torch.device("cpu"))
    assert peak > 1e8 and source == "measured: 1024x1024 float32 matmul on cpu"


class FakeAccelerator(SimpleNamespace):
    """One process, or `num_processes` identical ones (reduce sums identical values)."""

    def __init__(self, num_processes=1):
        super().__init__(num_processes=num_processes, device=torch.device("cpu"))

    def unwrap_model(self, model):
        return model

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor * self.num_processes


@pytest.mark.parametrize("processes", [1, 2])
def test_a_window_of_8_tokens_in_2_seconds_is_4_tokens_per_second_per_process(processes):
    times = iter([10.0, 12.0, 20.0, 21.0])
    shape = ModelShape(params=1000)
    throughput = Throughput(clock=lambda: next(times), shape=shape, peak=(16_000.0, "test"))
    throughput.add_step([collate_pairs([PAIR], pad_token_id=0)], [False], live_reference=False)  # the clock starts: 10
    record = throughput.record(FakeAccelerator(processes), model=None)  # 12
    flops = 6 * 1000 * 8
    assert record == {
        "tokens_per_second": 4.0 * processes,
        "padding_fraction": pytest.approx(0.2),
        "mfu": pytest.approx(flops / (2.0 * 16_000)),
        "mfu_peak": 16_000.0,
        "mfu_peak_source": "test",
    }
    throughput.add_step(
        [collate_packed([PAIR], 0, Layout(pack_length=8))], [False], live_reference=False
    )  # a new window: 20
    record = throughput.record(FakeAccelerator(processes), model=None)  # 21
    assert record == {
        "tokens_per_second": 8.0 * processes,
        "padding_fraction": 0.0,
        "mfu": pytest.approx(flops / 16_000),
    }


def test_every_logged_training_record_has_the_three_throughput_metrics(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(24, seed=1))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(train), "max_length": 32, "max_prompt_length": 16},
        "train": {"batch_size": 4, "max_steps": 4, "logging_steps": 2, "progress_bar": False},
        "speed": {"ref_cache": False, "pack_length": 64},
        "out_dir": str(tmp_path / "run"),
    }
    result = dpokit.train(cfg)
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert record["tokens_per_second"] > 0
        assert 0.0 <= record["padding_fraction"] < 1.0
        assert 0.0 < record["mfu"] < 1.0
    assert records[0]["mfu_peak"] > 0 and records[0]["mfu_peak_source"].startswith("measured: ")
    assert "mfu_peak" not in records[1]
    html = (result.run_dir / "report.html").read_text()
    assert 'id="plot-throughput"' in html and "tokens/s" in html
