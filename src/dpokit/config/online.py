"""The online verbs' settings: dpokit sample, score, pair, eval and pipeline (docs/pipeline.md), and their checks."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from dpokit.config.errors import ConfigError, check_choice


# --- the online verbs: dpokit sample, score, pair, eval, pipeline (docs/pipeline.md) ---------------

SAMPLING_BACKENDS = ("auto", "hf", "vllm")
PAIRING_STRATEGIES = ("best_worst", "all_pairs")
LENGTH_BALANCES = ("none", "closest")
JUDGE_MODES = ("pointwise", "pairwise")
MULTITURN_MODES = ("single", "pairwise")


@dataclass
class SamplingConfig:
    """`dpokit sample` and a pipeline's `sampling:` section."""

    num_samples: int = 4  # completions per prompt
    temperature: float = 1.0  # 0 = greedy (then every sample of a prompt is the same)
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 64  # sequences per generate call; a chunk holds max(1, batch_size // num_samples) prompts
    backend: str = "auto"  # auto (vLLM when installed with a GPU, else hf) | hf | vllm

    def __post_init__(self) -> None:  # built in code (dpokit sample, tests) or by the loader: checked either way
        check_sampling(self)

    @property
    def prompts_per_chunk(self) -> int:
        return max(1, self.batch_size // self.num_samples)


@dataclass
class PairingConfig:
    """`dpokit pair` and a pipeline's `pairing:` section (online/pairing.py explains each rule)."""

    strategy: str = "best_worst"  # best_worst | all_pairs
    min_margin: float = 0.0  # keep pairs with score(chosen) - score(rejected) >= min_margin (and > 0 always)
    length_balance: str = "none"  # none | closest (best_worst: the passing pair with the smallest length difference)
    max_length_ratio: Optional[float] = None  # drop pairs with longer/shorter token count above this
    max_pairs_per_prompt: Optional[int] = None  # all_pairs: keep the largest-margin pairs only
    drop_unfinished: bool = False  # leave out completions that hit max_new_tokens without EOS

    def __post_init__(self) -> None:
        check_pairing(self)


@dataclass
class EvalConfig:
    """`dpokit eval` and a pipeline's `eval:` section."""

    num_samples: int = 4
    max_new_tokens: Optional[int] = None  # None: sampling.max_new_tokens
    temperature: float = 1.0  # 1 and top_p 1 keep the KL estimate unbiased
    top_p: float = 1.0
    seed: int = 0
    max_prompts: Optional[int] = None
    pairs: Optional[str] = None  # held-out preference pairs for the implicit-reward accuracy
    max_pairs: Optional[int] = (
        None  # only the first N of those pairs (each costs a policy and a reference forward of both sides)
    )
    # `dpokit eval --suite` (online/suites/, docs/evaluation.md), each run on the policy and the baseline; a pipeline
    # refuses suites (its per-round eval does not run them):
    suites: list[str] = field(default_factory=list)  # names in online.suites.runner.SUITES (checked there)
    ifeval_prompts: Optional[str] = None  # IFEval-format JSONL; None: the shipped 48-prompt set
    multiturn_questions: Optional[str] = None  # two-turn questions JSONL; None: the shipped 10
    multiturn_mode: str = "single"  # single: an API judge rates each turn 1-10 | pairwise: policy vs baseline per turn
    suite_max_new_tokens: int = 256  # tokens per answer in the suites that answer prompts (greedy)
    lc_bootstrap: int = 200  # bootstrap resamples of the prompts for the LC win rate's standard error
    # `dpokit eval` only (a pipeline compares every round with its SFT model's samples, and refuses these):
    baseline: Optional[str] = None  # the model compared with; None: the reference (model.ref_name_or_path)
    local_judge: Optional[str] = None  # a local HF model as the pairwise judge when judge.base_url is unset

    def __post_init__(self) -> None:
        check_eval(self)


@dataclass
class JudgeConfig:
    """An LLM judge behind an OpenAI-compatible /v1/chat/completions endpoint (online/judges.py)."""

    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""  # the model name sent to the endpoint
    mode: str = "pointwise"  # pointwise (a 1-10 rating) | pairwise (A or B)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable read at each request; never stored
    timeout: float = 60.0  # seconds for a whole HTTP request (connect, send, reply), each retry its own
    max_retries: int = 4  # retries after the first attempt, with exponential backoff
    backoff: float = 1.0  # seconds before the first retry, doubled each time...
    max_backoff: float = 30.0  # ...up to this
    temperature: float = 0.0
    max_tokens: int = 64
    max_concurrency: int = 4  # requests in flight
    swap: bool = True  # pairwise: ask both orders and average (cancels position bias)


@dataclass
class ScoringConfig:
    """`dpokit score` and `dpokit eval`'s scorer (a pipeline names its own, `scorer`)."""

    scorer: Optional[str] = None  # module:function, path/file.py:function, or rm:MODEL (a reward model)


@dataclass
class FilesConfig:
    """The files `dpokit sample`, `score`, `pair` and `eval` read and write (a pipeline names its own)."""

    prompts: Optional[str] = None  # sample, eval: the prompts, a data file (anything data.path accepts)
    split: str = "train"  # sample: the prompts' split when they are a dataset with splits
    prompt_column: str = "prompt"  # sample, eval: the column holding the prompt (text or chat messages)
    max_prompts: Optional[int] = None  # sample: only the first N prompts (dpokit eval: eval.max_prompts)
    input: Optional[str] = None  # score, pair: the samples (scored samples) JSONL read
    out: Optional[str] = None  # sample, score, pair: the JSONL written (resumed); eval: the metrics JSON

    def __post_init__(self) -> None:
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"config key 'io.max_prompts' must be >= 1 or null (all prompts), got {self.max_prompts}")


DEPRECATED_TRUST_KEYS = ("trust_remote_code", "allow_pickle")  # PipelineConfig's own, before the one switch


@dataclass
class PipelineConfig:
    """`dpokit pipeline CONFIG`: K rounds of sample -> score -> pair -> DPO -> eval (online/pipeline.py)."""

    policy: str = ""  # the SFT model: folder, hub id, or demo:sentiment-sft
    prompts: Union[str, list[Any]] = ""  # training prompts: a data file, a list, or demo:openings-train
    eval_prompts: Union[str, list[Any], None] = None  # held-out prompts (demo:openings-eval); None: no per-round eval
    scorer: Any = None  # "module:function", "rm:MODEL", or a mapping (see dpokit.online.scoring.build_scorer)
    rounds: int = 2
    reference: str = "fixed"  # fixed: the SFT model every round | refresh: the previous round's policy
    prompts_per_round: Optional[int] = None  # a fresh seeded subset of the prompts each round; None: all
    prompt_column: str = "prompt"
    seed: int = 0
    # deprecated (for one release; they still switch trust on, with a warning): train.model.trust_remote_code and
    # train.model.allow_pickle are the one trust switch, and cover every model the pipeline loads
    trust_remote_code: bool = False
    allow_pickle: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    train: Union[str, dict[str, Any]] = field(
        default_factory=dict
    )  # a dpokit train config: mapping, YAML path or shipped name
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/pipeline"
    overwrite: bool = False  # write into an out_dir holding files dpokit did not write (refused otherwise)

    def __post_init__(self) -> None:
        for key in DEPRECATED_TRUST_KEYS:
            if getattr(self, key):
                warnings.warn(
                    f"config key {key!r} of a pipeline is deprecated and goes in the next release; set "
                    f"train.model.{key}: true instead, the one trust switch (it covers the policy, a reward "
                    "model and training)",
                    FutureWarning,
                    stacklevel=3,
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_sampling(s: SamplingConfig) -> None:
    for key, value in (
        ("num_samples", s.num_samples),
        ("max_new_tokens", s.max_new_tokens),
        ("batch_size", s.batch_size),
    ):
        if value < 1:
            raise ConfigError(f"config key 'sampling.{key}' must be >= 1, got {value}")
    if s.temperature < 0:
        raise ConfigError(f"config key 'sampling.temperature' must be >= 0 (0: greedy), got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"config key 'sampling.top_p' must be in (0, 1], got {s.top_p}")
    check_choice("sampling.backend", s.backend, SAMPLING_BACKENDS)


def check_pairing(p: PairingConfig) -> None:
    check_choice("pairing.strategy", p.strategy, PAIRING_STRATEGIES)
    check_choice("pairing.length_balance", p.length_balance, LENGTH_BALANCES)
    if p.min_margin < 0:
        raise ConfigError(f"config key 'pairing.min_margin' must be >= 0, got {p.min_margin}")
    if p.max_length_ratio is not None and p.max_length_ratio < 1:
        raise ConfigError(f"config key 'pairing.max_length_ratio' must be >= 1 or null, got {p.max_length_ratio}")


def check_eval(e: EvalConfig) -> None:
    if e.max_pairs is not None and e.max_pairs < 1:
        raise ConfigError(f"config key 'eval.max_pairs' must be >= 1 or null (all pairs), got {e.max_pairs}")
    check_choice("eval.multiturn_mode", e.multiturn_mode, MULTITURN_MODES)
    if e.suite_max_new_tokens < 1:
        raise ConfigError(f"config key 'eval.suite_max_new_tokens' must be >= 1, got {e.suite_max_new_tokens}")
    if e.lc_bootstrap < 0:
        raise ConfigError(f"config key 'eval.lc_bootstrap' must be >= 0 (0: no standard error), got {e.lc_bootstrap}")
