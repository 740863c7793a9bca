"""The one config: every section's settings with their defaults (model, lora, data, loss, optim, train,
speed, detectors, doctor; the online verbs' sampling, scoring, pairing, eval, judge, io) and the Config that holds them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from dpokit.config.online import EvalConfig, FilesConfig, JudgeConfig, PairingConfig, SamplingConfig, ScoringConfig
from dpokit.losses import LossConfig


@dataclass
class ModelConfig:
    name_or_path: str = ""  # local HF folder or hub id
    ref_name_or_path: Optional[str] = (
        None  # reference model; None: a frozen copy of the policy as loaded (LoRA: adapters off)
    )
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (the checkpoint's own)
    trust_remote_code: bool = False  # custom modelling code runs only if you say so
    allow_pickle: bool = False  # load pickle-based weights (pytorch_model.bin) when no safetensors exist
    revision: Optional[str] = None
    attn_implementation: Optional[str] = None  # e.g. sdpa, eager, flash_attention_2
    ref_dtype: Optional[str] = None  # live reference in this dtype (float32 | bfloat16 | float16); None: model.dtype
    quantization: str = "none"  # none | nf4 (QLoRA: 4-bit NF4 base via bitsandbytes, needs lora.enabled)


@dataclass
class LoraConfig:
    enabled: bool = False  # the reference is then the same model with adapters disabled
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    save: str = "adapter"  # adapter (PEFT folder) | merged (plain HF model)


@dataclass
class DataConfig:
    path: str = ""  # jsonl/json/parquet/csv (.gz), a save_to_disk folder, or a hub id
    split: str = "train"
    layout: str = "auto"  # auto | prompt_chosen_rejected | implicit_prompt | sharegpt | openai | alpaca | stack_exchange | every_turn | step_dpo
    columns: dict[str, str] = field(default_factory=dict)  # e.g. {prompt: question, chosen: good, rejected: bad}
    eval_path: Optional[str] = None  # held-out pairs; if unset, eval_fraction of the training rows is held out
    eval_split: str = "test"  # split of eval_path when it is a dataset with splits
    eval_fraction: float = 0.0
    max_length: int = 1024  # prompt + completion tokens; the completion is cut from the right to fit
    # prompt tokens; the prompt is cut from the left so the latest turns survive. null (the default) resolves
    # to max_length // 2 when the config is loaded, so every reader sees an int (1024 -> 512, 256 -> 128)
    max_prompt_length: Optional[int] = None
    max_rows: Optional[int] = None  # use only the first N rows (for quick trials)
    strict: bool = False  # stop at the first bad row instead of skipping and reporting it
    # Token health (data/token_health.py): training stops before any compute when more than this share of the
    # sampled tokens is the tokenizer's unknown token (a tokenizer made for the text gives ~0%; the doctor FAILs
    # past it too). Raise it only when the unknown tokens are expected, e.g. symbols the model never needs to read.
    max_unknown_token_rate: float = 0.10
    # Completions the chat template renders as nothing (tool calls it ignores, or no token but the end-of-turn
    # marker) are skipped and counted; past this share of the pairs (or completions) training stops before any
    # compute: the template, not a few odd rows, is at fault (docs/data.md, "Skipped rows")
    max_empty_render_fraction: float = 0.01
    # rows with images (an `images` column, {"type": "image"} parts in the prompt's messages): tokenised by the
    # model's processor (AutoProcessor), pixel_values travel with each pair; paired losses only (docs/data.md)
    vision: bool = False
    # Image paths in rows resolve against the data file's folder and must stay inside it (a dataset is untrusted:
    # "../../etc/passwd" or "/dev/zero" is a counted skip). Folders listed here are allowed too (docs/robustness.md).
    image_root: list[str] = field(default_factory=list)
    # Text the run should not forget (SFT rows: prompt/completion or messages, as `dpokit sft` reads; not pairs).
    # At each evaluation the token-mean NLL of its completions is logged for the policy and the reference:
    # retention/nll, retention/nll_ref, retention/nll_delta (docs/evaluation.md, "Retention during training")
    retention_path: Optional[str] = None
    # SFT rows whose completion NLL is added to the preference loss at loss.sft_mix_weight (logged as sft_mix/nll)
    sft_mix_path: Optional[str] = None
    sft_mix_batch_size: int = (
        0  # SFT examples per micro-batch and process; 0 = ceil(train.batch_size / 10) (~10% of the pairs)
    )


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw_8bit (bitsandbytes: 8-bit moments, ~1/4 of AdamW's state memory)
    fused: bool = True  # adamw: torch's fused kernel (HF Trainer's default adamw_torch_fused since torch 2.8); false = for-each (adamw_torch)
    lr: float = 1e-6  # TRL's DPO default; LoRA usually wants ~5e-6 or more
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # takes precedence over warmup_ratio when > 0


@dataclass
class TrainConfig:
    task: str = "preference"  # preference (the DPO family, KTO; by loss.type) | sft (completion-only NLL: dpokit sft)
    batch_size: int = 8  # pairs per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; -1 = derived from epochs
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 0  # 0 = evaluate only at the end (when there is eval data)
    eval_batch_size: int = 0  # 0 = batch_size
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate autocast)
    gradient_checkpointing: bool = (
        True  # as TRL: recompute activations in backward (~1/3 more compute, far less memory)
    )
    progress_bar: bool = True
    report_to: list[str] = field(default_factory=list)  # tensorboard | wandb | mlflow, through Accelerate's trackers
    eval_generate: int = 0  # completions sampled at each evaluation to log eval_mean_length; 0 = off
    save_steps: int = 500  # checkpoint every N optimizer steps, and at the end; 0 = no checkpoints
    save_total_limit: int = 2  # keep the last K checkpoints; 0 = keep all
    resume: str = "auto"  # auto (latest complete checkpoint in out_dir) | never | path of a checkpoint folder
    overwrite: bool = (
        False  # write into an out_dir holding files dpokit did not write (refused otherwise; docs/training.md)
    )
    max_skipped_steps: int = 5  # optimizer steps skipped on a NaN/Inf loss or gradient before the run stops
    fsdp: bool = False  # FSDP2 full sharding of the policy (and a live reference) over the launched processes (docs/distributed.md)
    num_threads: int = 0  # torch CPU threads; 0 = auto: torch's default with OpenMP's passive wait (dpokit/openmp.py), else 1 under 50M parameters
    push_to_hub: Optional[str] = (
        None  # a Hub model repo id: final/ (model, tokenizer, README.md card) is uploaded there after saving
    )
    hub_private: bool = True  # a repo push_to_hub creates is private (an existing repo keeps its visibility)


@dataclass
class SpeedConfig:
    """The paired (DPO-family) step's fast paths; each gives the plain path's numbers (docs/performance.md)."""

    packing: bool = True  # several pairs per row, no padding between them
    prefix_sharing: bool = True  # the prompt computed once for chosen and rejected
    chunked_logps: bool = True  # LM head + log-softmax over chunks of completion tokens, recomputed in backward
    logps_chunk_size: int = 0  # tokens per LM-head chunk; 0 = auto (about 4M logits per chunk)
    pack_length: int = 0  # tokens per packed row; 0 = auto (sdpa: the whole micro-batch in one row)
    ref_cache: bool = True  # reference log-probs computed once, stored on disk, reused; no reference in memory
    ref_cache_dir: str = ""  # "" = $DPOKIT_CACHE/ref_logps, else ~/.cache/dpokit/ref_logps
    attention: str = "auto"  # fast-path attention when model.attn_implementation is unset: auto | sdpa | flex | flash
    tiled_mlp: int = (
        0  # tokens per MLP tile: the decoder MLPs run over sequence chunks, recomputed in backward; 0 = off
    )

    @property
    def any_fast_path(self) -> bool:
        return self.packing or self.prefix_sharing or self.chunked_logps or self.ref_cache


@dataclass
class DetectorsConfig:
    """Where the live failure detectors fire (detectors.py, docs/diagnosis.md); letters name the failure mode."""

    chosen_logp_drop: float = 10.0  # (a) logps/chosen falls by more than this many nats per sequence...
    chosen_logp_drop_fraction: float = (
        0.1  # (a) ...and more than this share of its start (long completions are noisier)...
    )
    margin_rise: float = 0.1  # (a) ...while rewards/margins rise by more than this
    smoothing: int = 3  # (a) records averaged at the start and at the end, to ride out batch noise
    length_growth: float = 1.5  # (b) mean length above this multiple of its first value
    length_shrink: float = 0.67  # (b) mean length below this multiple of its first value
    kl_warn: float = 5.0  # (c) nats per sequence: the guide's "5-10 nats" range
    kl_high: float = 10.0
    margin_window: int = 5  # (c) last K records in which margins must keep growing
    plateau_ratio: float = 0.5  # (c) growth in the second half of the window vs the first half: >= this = no plateau
    accuracy_after: int = 20  # (d) records before accuracy near 0.5 counts as stuck
    accuracy_band: float = 0.05  # (d) |mean accuracy - 0.5| <= this, over the last `smoothing` records
    oscillation_window: int = 20  # (d) last losses examined for oscillation
    oscillation_sign_share: float = 0.6  # (d) share of consecutive loss differences that change sign (smooth: ~0)
    oscillation_amplitude: float = 0.1  # (d) mean |loss difference| in nats
    eval_rise_count: int = 2  # (e) consecutive rising eval losses that warn
    early_stop_patience: Optional[int] = None  # (e) consecutive rises tolerated; more stops the run (None: never)
    # (g) forgetting: retention/nll_delta (policy minus reference NLL on data.retention_path, nats per token) above
    # both limits. +0.3 nats/token multiplies the text's perplexity by e^0.3 = 1.35; the relative limit (20% of the
    # reference's NLL) asks more of text the reference already finds hard. The delta cannot tell forgetting from the
    # alignment: on the demo's SFT text with its negative reviews the shipped config passed it on the negative words
    # alone, so the demo's retention set is positive reviews (docs/evaluation.md, "Choosing the retention set")
    forgetting_nll_delta: float = 0.3
    forgetting_nll_delta_fraction: float = 0.2


@dataclass
class DoctorConfig:
    """Where each `dpokit doctor` check turns from ok to warn (or fail); documented in docs/diagnosis.md."""

    # Dropped rows: any dropped row warns (it is data you thought you had); more than this share fails.
    dropped_fail_share: float = 0.5
    # Length bias: DPO's summed log-probs reward length, so a systematic length gap is a shortcut to learn.
    # Warn when chosen is longer (or shorter) in more than this share of pairs, or the median chosen/rejected
    # ratio passes 1.3 (or 1/1.3); and only when a sign test says the split is not chance (p below 0.05:
    # with 5 pairs or fewer no split can be told from chance, with 100 pairs 60/40 already can).
    length_share_longer: float = 0.65
    length_median_ratio: float = 1.3
    length_sign_test_p: float = 0.05
    # Truncation at data.max_length / data.max_prompt_length: a cut completion loses its EOS.
    truncation_warn_share: float = 0.05
    truncation_fail_share: float = 0.5
    # Reference log-probs, length-normalised (nats per completion token).
    min_token_logp: float = -4.0  # below: the data is far from what the reference would write
    wrong_way_margin: float = 0.5  # logp(rejected) - logp(chosen) per token above this = "strongly prefers rejected"
    wrong_way_share: float = 0.2  # more than this share of such pairs hints at label noise
    # Unknown tokens: above this share of the sampled tokens the doctor warns (it fails past data.max_unknown_token_rate).
    unknown_token_warn_rate: float = 0.01


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    detectors: DetectorsConfig = field(default_factory=DetectorsConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    # the online verbs' sections (config/online.py): dpokit sample, score, pair and eval read them; training does not
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    io: FilesConfig = field(default_factory=FilesConfig)
    out_dir: str = "runs/dpo"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
