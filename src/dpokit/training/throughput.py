"""Throughput of the logging window: tokens_per_second, padding_fraction and mfu (definitions: docs/performance.md).

    throughput = Throughput()                             # one per run (Run.throughput)
    throughput.add_step(micro_batches, dummies, ...)      # every optimizer step, before its forwards (step_runner)
    record.update(throughput.record(accelerator, model))  # every logged step: summed over processes, window reset

What is counted is read off the collated batches, so it is what the model ran:
  tokens     real tokens of the trained sequences, each pair's prompt once per completion
             (prompt + chosen, prompt + rejected: TRL's num_tokens), whatever the layout
  positions  positions the model computed: rows x row width of every batch it ran (packed rows, padded
             rows, a shared prompt once), and how many of them are padding
  FLOPs      6 x N x tokens + 6 x layers x width x sum(T^2) for the policy's forward and backward, plus
             2 x N x tokens + 2 x layers x width x sum(T^2) per forward without gradient (a live
             reference; KTO's mismatched KL rows)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

VOLATILE = ("tokens_per_second", "mfu", "mfu_peak", "mfu_peak_source")  # depend on the clock or the machine

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s per GPU; the first match wins.
BF16_DENSE_PEAKS = (
    (r"\bH100\b.*\bNVL\b", 835e12), (r"\bH100\b.*\bPCIe\b", 756e12), (r"\bH100\b", 989e12),  # SXM
    (r"\bH200\b.*\bNVL\b", 835e12), (r"\bH200\b", 989e12),
    (r"\bB200\b", 2250e12), (r"\bA100\b", 312e12), (r"\bL40S\b", 362e12), (r"\bL4\b", 121e12), (r"\bA10\b", 125e12),
)  # fmt: skip


@dataclass
class Work:
    """What some micro-batches asked of the model (see the module docstring)."""

    tokens: int = 0  # real tokens of the trained sequences
    positions: int = 0  # positions computed, trained and forward-only rows alike
    padding: int = 0  # of those, padding
    squares: int = 0  # sum over the trained sequences of length^2 (the attention term)
    forward_tokens: int = 0  # tokens of sequences run forward without gradient (a live reference, KTO's KL rows)
    forward_squares: int = 0

    def __iadd__(self, other: "Work") -> "Work":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass(frozen=True)
class ModelShape:
    """What model FLOPs depend on: N (parameters but the input embedding table), layers and attention width."""

    params: int
    layers: int = 0
    width: int = 0  # attention heads x head dim; 0 (unknown): no attention term

    def forward_flops(self, tokens: float, squares: float) -> float:
        """One forward over sequences of `tokens` tokens in all whose squared lengths sum to `squares` (causal attention)."""
        return 2.0 * self.params * tokens + 2.0 * self.layers * self.width * squares

    def flops(self, work: Work) -> float:
        """Model FLOPs: 3 forwards' worth (forward and backward) of the trained sequences, 1 of the forward-only ones."""
        return 3.0 * self.forward_flops(work.tokens, work.squares) + self.forward_flops(
            work.forward_tokens, work.forward_squares
        )


def sequence_lengths(batch: dict, prefix: str = "") -> list[int]:
    """Real length of every sequence in a collated batch: a packed unit with a shared prompt is two sequences,
    prompt + chosen and prompt + rejected; a padded row is its attention mask's sum."""
    if not prefix and "units" in batch:
        out = []
        for _, _, prompt, first, second in batch["units"].tolist():
            out += [prompt + first] + ([prompt + second] if second else [])
        return out
    mask = batch.get(prefix + "attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(dim=1).tolist()]
    ids = batch[prefix + "input_ids"]
    return [ids.shape[1]] * ids.shape[0]


def computed_positions(batch: dict, prefix: str = "") -> tuple[int, int]:
    """(positions the model computes for the rows under `prefix`, how many of them are padding)."""
    ids = batch[prefix + "input_ids"]
    if prefix + "segment_ids" in batch:  # packed rows: -1 marks padding
        real = int((batch[prefix + "segment_ids"] >= 0).sum())
    elif prefix + "attention_mask" in batch:
        real = int(batch[prefix + "attention_mask"].sum())
    else:
        real = ids.numel()
    return ids.numel(), ids.numel() - real


def batch_work(batch: dict, live_reference: bool) -> Work:
    """The work of one micro-batch: its trained rows, KTO's KL rows (kl_*, forward only), a live reference's forward."""
    lengths = sequence_lengths(batch)
    positions, padding = computed_positions(batch)
    work = Work(tokens=sum(lengths), positions=positions, padding=padding, squares=sum(n * n for n in lengths))
    passes = 1 + int(live_reference)  # forwards without gradient over the KL rows: the policy's, the reference's
    if "kl_input_ids" in batch:
        kl_lengths = sequence_lengths(batch, "kl_")
        kl_positions, kl_padding = computed_positions(batch, "kl_")
        work.positions += kl_positions
        work.padding += kl_padding
        work.forward_tokens += passes * sum(kl_lengths)
        work.forward_squares += passes * sum(n * n for n in kl_lengths)
    if live_reference:
        work.forward_tokens += work.tokens
        work.forward_squares += work.squares
    return work


def padding_fraction(padding: float, positions: float) -> float:
    return padding / positions if positions else 0.0


def tokens_per_second(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs over what the devices could do in the time: flops / (seconds x peak FLOP/s, summed over devices)."""
    return flops / (seconds * peak) if seconds > 0 and peak > 0 else float("nan")


def table_peak(device_name: str) -> Optional[float]:
    """The bf16 dense peak of a known GPU (BF16_DENSE_PEAKS), from its torch.cuda.get_device_name(); None if unknown."""
    return next((peak for pattern, peak in BF16_DENSE_PEAKS if re.search(pattern, device_name, re.IGNORECASE)), None)


def measure_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """FLOP/s of an n x n torch.matmul on `device`, the best of `repeats` after one warm-up (bench/dpo_vs_trl.py's)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Its own generator: drawing from the global one would shift the run's dropout noise after every (re)start.
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / max(best, 1e-9)


def device_peak(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it comes from): the table for a known GPU, else a matmul measured here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name)
        if peak is not None:
            return peak, f"table: {name}, bf16 dense"
        dtype, n = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32), 4096
    else:
        dtype, n = torch.float32, 1024
    return measure_peak(
        device, dtype, n
    ), f"measured: {n}x{n} {str(dtype).removeprefix('torch.')} matmul on {device.type}"


def _numel(p) -> int:
    shape = getattr(
        getattr(p, "quant_state", None), "shape", None
    )  # bitsandbytes 4-bit: the packed tensor is half the size
    if shape is not None:
        return int(torch.Size(shape).numel())
    return int(getattr(p, "ds_numel", 0) or p.numel())  # DeepSpeed ZeRO-3 keeps the full size in ds_numel


def model_shape(model) -> ModelShape:
    """N, layers and attention width of a (unwrapped) causal LM. N counts every parameter but the input
    embedding table, a lookup with no matmul (tied to the LM head, it counts once, as the head)."""
    params = sum(_numel(p) for p in model.parameters())
    try:
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        if head is None or head.weight is not embedding:
            params -= _numel(embedding)
    except (AttributeError, NotImplementedError):
        pass
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return ModelShape(params=params, layers=int(layers), width=int(heads * head_dim))


class Throughput:
    """The logging window's work and wall time on this process; `record` sums both over the processes and starts a new window.

    The window's clock starts at its first `add_step` (before that step's forwards) and stops at `record`, so an
    evaluation or checkpoint taken at a logging step, and the peak measurement, fall between windows.
    A dummy micro-batch (a process with no example left at the end of an epoch) trains nothing and is not counted.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        shape: Optional[ModelShape] = None,
        peak: Optional[tuple[float, str]] = None,
    ) -> None:
        self.clock = clock
        self.work = Work()
        self.started: Optional[float] = None
        self.shape = shape  # None: read off the model at the first record
        self.peak = peak  # this device's (FLOP/s, source); None: device_peak at the first record
        self.records = 0

    def add(self, work: Work) -> None:
        if self.started is None:
            self.started = self.clock()
        self.work += work

    def add_step(self, batches: list[dict], dummies: list[bool], live_reference: bool, mixed=None) -> None:
        """One optimizer step's micro-batches (and the SFT batches mixed into it, steps/sft_mix.MixedBatches).
        `live_reference`: a reference is run, i.e. the step has one and its log-probs are not in the batch (ref_cache)."""
        for batch, dummy in zip(batches, dummies):
            if not dummy:
                self.add(batch_work(batch, live_reference and "ref_logps" not in batch))
        for batch, dummy in zip(mixed.batches, mixed.dummies) if mixed is not None else ():
            if not dummy:
                self.add(batch_work(batch, live_reference=False))

    def record(self, accelerator, model) -> dict:
        """tokens_per_second, padding_fraction, mfu over the window (all processes); the first record also has
        mfu_peak (FLOP/s of one device, the mean over processes) and mfu_peak_source. Starts a new window."""
        seconds = self.clock() - self.started if self.started is not None else 0.0
        if self.shape is None:
            self.shape = model_shape(accelerator.unwrap_model(model))
        if self.peak is None:
            self.peak = device_peak(torch.device(accelerator.device))
        work = self.work
        packed = torch.tensor(
            [work.tokens, work.positions, work.padding, self.shape.flops(work), seconds, self.peak[0]],
            dtype=torch.float64,
        )
        world = accelerator.num_processes
        if world > 1:
            packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum").cpu()
        tokens, positions, padding, flops, seconds, peaks = packed.tolist()
        seconds /= world  # the processes' mean wall time of the window (they wait for each other every step)
        self.work, self.started = Work(), None
        out = {
            "tokens_per_second": tokens_per_second(tokens, seconds),
            "padding_fraction": padding_fraction(padding, positions),
            "mfu": mfu(flops, seconds, peaks),
        }
        if self.records == 0:
            out.update(mfu_peak=peaks / world, mfu_peak_source=self.peak[1])
        self.records += 1
        return out
