"""`dpokit score`: rewards for (prompt, completion) pairs, behind one interface (online/scorer.py).

    class Scorer:  score(prompts, completions) -> list[float]

Scorers:
  FunctionScorer     a Python function, `module:function` (rule-based / verifiable rewards). Called by
                     its signature: f(completion) with one parameter, f(prompt, completion) with two,
                     or once per batch as f(prompts=[...], completions=[...]) when it has a parameter
                     named `completions` (TRL's reward-function convention). Example:
                     `dpokit.demo.world:sentiment`.
  RewardModelScorer  a Hugging Face sequence-classification model (local folder or hub id), loaded with
                     `dpokit train`'s safety checks. One label: the logit is the reward. Several: the
                     probability of the positive label (the label named like "positive", else the last
                     one; `label` picks another).
  JudgeScorer        an LLM judge, pointwise (a 1-10 rating), and
  PairwiseJudge      the same comparing two completions: online/judges.py.

`build_scorer` makes one from a spec (a string or a mapping); `score_file` scores a samples file,
resumably.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import time
from pathlib import Path
from typing import Any, Callable, Union

import torch

from dpokit.config import Config, JudgeConfig
from dpokit.config.flags import Flag, Verb, require
from dpokit.model_source import ModelLoadError
from dpokit.online.judges import JudgeScorer, PairwiseJudge, judge_flags, judge_options
from dpokit.online.loading import TRUST_FLAGS, ModelTrust, load_model
from dpokit.inputs import InputError, check_file
from dpokit.online.prompts import Prompt, prompt_key
from dpokit.online.sampling import append_rows, read_samples
from dpokit.online.scorer import ScoringError, check_lengths


# --- Python functions ---------------------------------------------------------------------------


def load_function(spec: str) -> Callable:
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise ScoringError(f"a function scorer is 'module:function' (e.g. dpokit.demo.world:sentiment), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            try:  # the input gateway: a regular file within the size limit (not a FIFO, not /dev/zero)
                check_file(path, "module", "--scorer")
            except InputError as error:
                raise ScoringError(str(error)) from None
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None:
                raise ScoringError(f"cannot load {module_name!r} as a Python module for scorer {spec!r}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ScoringError(f"cannot import {module_name!r} for scorer {spec!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ScoringError(f"{module_name!r} has no function {name!r} (scorer {spec!r})")
    return fn


class FunctionScorer:
    """A rule-based reward: a Python function of the completion (and the prompt)."""

    def __init__(self, fn: Union[Callable, str]):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = load_function(fn) if isinstance(fn, str) else fn
        params = inspect.signature(self.fn).parameters
        self.batched = "completions" in params
        positional = [
            p
            for p in params.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        self.takes_prompt = len(positional) >= 2

    def score(self, prompts, completions) -> list[float]:
        check_lengths(prompts, completions)
        if self.batched:
            values = self.fn(prompts=list(prompts), completions=list(completions))
        elif self.takes_prompt:
            values = [self.fn(p, c) for p, c in zip(prompts, completions)]
        else:
            values = [self.fn(c) for c in completions]
        values = [float("nan") if v is None else float(v) for v in values]
        if len(values) != len(completions):
            raise ScoringError(f"scorer {self.name} returned {len(values)} scores for {len(completions)} completions")
        return values


# --- reward models ------------------------------------------------------------------------------


def _conversation_text(tokenizer, prompt: Prompt, completion: str) -> str:
    if isinstance(prompt, str):
        return prompt + completion
    if not getattr(tokenizer, "chat_template", None):
        raise ScoringError("conversational prompts need a reward-model tokenizer with a chat template")
    return tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": completion}], tokenize=False)


class RewardModelScorer:
    """An HF sequence-classification reward model scoring prompt + completion."""

    def __init__(
        self,
        name_or_path: str,
        batch_size: int = 16,
        device: str | None = None,
        label: Union[int, str, None] = None,
        max_length: int | None = None,
        dtype: str = "auto",
        trust: ModelTrust = ModelTrust(),
    ):
        # lazy: transformers takes seconds to import, and `dpokit --help` imports this module
        from transformers import AutoModelForSequenceClassification

        try:
            self.model, self.tokenizer = load_model(
                name_or_path, trust, auto_class=AutoModelForSequenceClassification, device=device, dtype=dtype
            )
        except ModelLoadError as e:
            raise ScoringError(f"could not load the reward model {name_or_path!r}: {e}") from None
        self.name = name_or_path
        if self.model.config.pad_token_id is None:  # the model finds each row's last token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = next(self.model.parameters()).device
        self.batch_size, self.max_length = batch_size, max_length
        self.label_index = self._label_index(label)

    def _label_index(self, label) -> int | None:
        n = self.model.config.num_labels
        if n == 1:
            return None
        names = {str(v).lower(): int(k) for k, v in (self.model.config.id2label or {}).items()}
        if isinstance(label, int):
            return label
        if isinstance(label, str):
            if label.lower() not in names:
                raise ScoringError(f"reward model {self.name!r} has no label {label!r}; labels: {', '.join(names)}")
            return names[label.lower()]
        for candidate in ("positive", "pos", "label_1", "good", "chosen"):
            if candidate in names:
                return names[candidate]
        return n - 1

    def score(self, prompts, completions) -> list[float]:
        check_lengths(prompts, completions)
        texts = [_conversation_text(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    return_tensors="pt",
                    add_special_tokens=True,
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                if self.label_index is None:
                    values = logits[:, 0]
                else:
                    values = logits.softmax(-1)[:, self.label_index]
                out += values.cpu().tolist()
        return out


# --- from a spec --------------------------------------------------------------------------------

# A judge spec's keys: JudgeConfig's (mode and swap are read apart), and the prompt texts.
JUDGE_KEYS = tuple(f.name for f in dataclasses.fields(JudgeConfig) if f.name not in ("mode", "swap")) + (
    "template",
    "system",
)


def build_scorer(spec: Any, trust: ModelTrust = ModelTrust()) -> Any:
    """A Scorer (or PairwiseJudge) from a spec:

      "module:function" | "path/file.py:function"   -> FunctionScorer
      "rm:PATH_OR_HUB_ID"                           -> RewardModelScorer
      a callable                                    -> FunctionScorer
      {"type": "function", "function": "module:function"}
      {"type": "reward_model", "path": ..., "batch_size": 16, "label": null}
      {"type": "judge", "base_url": "http://127.0.0.1:8000/v1", "model": ..., "mode": "pointwise"|"pairwise",
       "api_key_env": "OPENAI_API_KEY", "max_retries": 4, "timeout": 60, ...}

    trust: what a reward model may be (custom code, pickle weights); by default neither.
    """
    if isinstance(spec, (FunctionScorer, RewardModelScorer, JudgeScorer, PairwiseJudge)) or (
        not isinstance(spec, (str, dict)) and hasattr(spec, "score")
    ):
        return spec
    if callable(spec):
        return FunctionScorer(spec)
    if isinstance(spec, str):
        if spec.startswith(("rm:", "reward_model:")):
            return RewardModelScorer(spec.split(":", 1)[1], trust=trust)
        return FunctionScorer(spec)
    if isinstance(spec, dict):
        options = dict(spec)
        kind = options.pop("type", None)
        if kind == "function":
            return FunctionScorer(options["function"])
        if kind == "reward_model":
            path = options.pop("path", None) or options.pop("name_or_path", None)
            if not path:
                raise ScoringError("a reward_model scorer needs `path` (a folder or hub id)")
            return RewardModelScorer(path, trust=trust, **options)
        if kind == "judge":
            mode = options.pop("mode", "pointwise")
            unknown = set(options) - set(JUDGE_KEYS) - {"swap"}
            if unknown or "base_url" not in options or "model" not in options:
                raise ScoringError(
                    f"a judge scorer needs base_url and model (and takes {', '.join(JUDGE_KEYS)}, swap); got {sorted(spec)}"
                )
            if mode == "pairwise":
                return PairwiseJudge(**options)
            if mode != "pointwise":
                raise ScoringError(f"judge mode must be pointwise or pairwise, got {mode!r}")
            options.pop("swap", None)
            return JudgeScorer(**options)
        raise ScoringError(f"scorer type must be function, reward_model or judge; got {kind!r}")
    raise ScoringError(f"cannot build a scorer from {spec!r}")


# --- files --------------------------------------------------------------------------------------


SCORE_CHUNK_SIZE = 256  # rows per scorer call; each chunk is appended (and resumable) once scored


def score_file(
    in_path: str | Path,
    out_path: str | Path,
    scorer,
    chunk_size: int = SCORE_CHUNK_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Add a `score` to every row of a samples file, into out_path; resumable (rows already scored are kept).

    Rows are matched by (prompt, sample_index). Returns counts: rows, already_scored, scored, unscored (NaN).
    progress(done, total) is called before the first chunk (done: the rows already scored) and after each.
    """
    rows = read_samples(in_path, label="--in", must_exist=True)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(prompt_key(r["prompt"]), r.get("sample_index", 0)) for r in read_samples(out)}
    todo = [r for r in rows if (prompt_key(r["prompt"]), r.get("sample_index", 0)) not in done]
    if progress is not None and todo:
        progress(len(done), len(rows))
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        scores = scorer.score([r["prompt"] for r in chunk], [r["completion"] for r in chunk])
        append_rows(
            out,
            [{**r, "score": (None if s is None or not math.isfinite(s) else float(s))} for r, s in zip(chunk, scores)],
        )
        if progress is not None:
            progress(len(done) + start + len(chunk), len(rows))
    unscored = sum(r.get("score") is None for r in read_samples(out))
    return {"rows": len(rows), "already_scored": len(rows) - len(todo), "scored": len(todo), "unscored": unscored}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class ProgressLine:
    """A line per chunk: '[score] 512/2048 rows, 41s elapsed, about 2m 03s left' (the pace of this run)."""

    def __init__(self, label: str, unit: str = "rows", clock: Callable[[], float] = time.monotonic):
        self.label, self.unit, self.clock = label, unit, clock
        self.started = self.first = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.started is None:  # the first call: what was already done before this run
            self.started, self.first = now, done
            print(f"[{self.label}] {done}/{total} {self.unit} ({total - done} to do)", flush=True)
            return
        elapsed, new = now - self.started, done - self.first
        left = f", about {_duration(elapsed / new * (total - done))} left" if new and done < total else ""
        print(f"[{self.label}] {done}/{total} {self.unit}, {_duration(elapsed)} elapsed{left}", flush=True)


SCORE_HELP = """\
Score every completion of a samples file (from `dpokit sample`) and write it with a `score` field.
Rerunning resumes: rows already in --out are not scored again.

  dpokit score --in samples.jsonl --out scored.jsonl --scorer dpokit.demo.world:sentiment
  dpokit score --in samples.jsonl --out scored.jsonl --scorer rm:path/to/reward-model
  dpokit score --in samples.jsonl --out scored.jsonl --judge-url http://127.0.0.1:8000/v1 --judge-model qwen2.5-7b-instruct

--scorer is module:function (a rule-based reward: f(completion), f(prompt, completion), or
f(prompts=..., completions=...)) or rm:MODEL (a sequence-classification reward model).
A judge (--judge-url) rates each completion 1-10 through /v1/chat/completions; its API key
is read from the environment variable named by --api-key-env (default OPENAI_API_KEY). Each
request takes at most --timeout seconds in all (a slow reply too) and is retried --max-retries
times (with backoff), so an unanswered request costs at most (retries + 1) x timeout plus the
backoff waits. How replies are read: docs/evaluation.md, "Judge replies".
A progress line (count, elapsed, time left) is printed after every chunk of rows.

Every flag is an alias of a config key (shown in its help: io.*, scoring.scorer, judge.*), so the
settings can come from a YAML file and key=value overrides too, as for `dpokit train`:

  dpokit score score.yaml io.input=samples.jsonl io.out=scored.jsonl
"""


SCORE_FLAGS = (
    Flag(("--in",), "io.input", "samples JSONL, dpokit sample's output (required)", dest="in_path"),
    Flag(("--out",), "io.out", "scored JSONL, resumable (required)", dest="out"),
    Flag(("--scorer",), "scoring.scorer", "module:function or rm:MODEL"),
    *judge_flags("OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"),
    Flag(("--concurrency",), "judge.max_concurrency", "judge requests in flight"),
    *TRUST_FLAGS,  # for a reward model (rm:MODEL)
)


def run_cli(cfg: Config) -> int:
    """`dpokit score` on its config: io.input, io.out, scoring.scorer or judge.*, model.trust_remote_code/allow_pickle."""
    in_path = require(cfg, "io.input", "--in", "the samples file")
    out = require(cfg, "io.out", "--out", "the output file")
    if bool(cfg.scoring.scorer) == bool(cfg.judge.base_url):
        raise ScoringError("give exactly one of --scorer and --judge-url (scoring.scorer, judge.base_url)")
    if cfg.judge.base_url:
        scorer = JudgeScorer(
            cfg.judge.base_url, cfg.judge.model, max_concurrency=cfg.judge.max_concurrency, **judge_options(cfg.judge)
        )
    else:
        scorer = build_scorer(cfg.scoring.scorer, ModelTrust.of(cfg.model))
    report = score_file(in_path, out, scorer, chunk_size=SCORE_CHUNK_SIZE, progress=ProgressLine("score"))
    print(
        f"[score] {report['scored']} rows scored, {report['already_scored']} already scored, "
        f"{report['unscored']} without a score; written to {out}"
    )
    return 0


VERB = Verb(
    "score", "score sampled completions (rule, reward model or LLM judge)", SCORE_HELP, run_cli, flags=SCORE_FLAGS
)
