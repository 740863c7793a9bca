"""`dpokit score`: rewards for (prompt, completion) pairs, behind one interface.

    class Scorer:  score(prompts, completions) -> list[float]

Scorers:
  FunctionScorer     a Python function, `module:function` (rule-based / verifiable rewards). Called by
                     its signature: f(completion) with one parameter, f(prompt, completion) with two,
                     or once per batch as f(prompts=[...], completions=[...]) when it has a parameter
                     named `completions` (TRL's reward-function convention). Example:
                     `dpokit.demo.world:sentiment`.
  RewardModelScorer  a Hugging Face sequence-classification model (local folder or hub id). One label:
                     the logit is the reward. Several: the probability of the positive label (the
                     label named like "positive", else the last one; `label` picks another).
  JudgeScorer        an LLM judge behind an OpenAI-compatible /v1/chat/completions endpoint, pointwise:
                     a 1-10 rating parsed from its reply (NaN when no rating can be read; counted).
  PairwiseJudge      the same endpoint comparing two completions (A/B): `compare(prompts, a, b)` ->
                     1.0 (A better), 0.0 (B better), 0.5 (tie or unreadable); `swap=True` asks both
                     orders and averages, cancelling the judge's position bias. For win rates.

The judge's API key is read from an environment variable (`api_key_env`, default OPENAI_API_KEY) at
each request, sent only in the Authorization header, never stored on the object, logged or put in an
error message. Requests are retried with exponential backoff on 429, 5xx, timeouts and refused
connections (honouring Retry-After); after `max_retries` retries `JudgeUnreachable` says which URL
could not be reached and why. Only the standard library (urllib) is used.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

Prompt = Union[str, list]


class ScoringError(RuntimeError):
    """A scorer cannot be built or used; the message says what to fix."""


class JudgeUnreachable(ScoringError):
    """The judge endpoint could not be reached (or kept failing) after every retry."""


@runtime_checkable
class Scorer(Protocol):
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]: ...


def _check_lengths(prompts, completions) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


# --- Python functions ---------------------------------------------------------------------------


def load_function(spec: str) -> Callable:
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise ScoringError(f"a function scorer is 'module:function' (e.g. dpokit.demo.world:sentiment), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or not path.is_file():
                raise ScoringError(f"no such file {module_name!r} for scorer {spec!r}")
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
        positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        self.takes_prompt = len(positional) >= 2

    def score(self, prompts, completions) -> list[float]:
        _check_lengths(prompts, completions)
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

    def __init__(self, name_or_path: str, batch_size: int = 16, device: str | None = None, label: Union[int, str, None] = None,
                 max_length: int | None = None, dtype: str = "auto"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpokit.models import DTYPES

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=DTYPES[dtype])
        except (OSError, ValueError) as e:
            raise ScoringError(f"could not load the reward model {name_or_path!r}: {e}") from None
        self.name = name_or_path
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the model finds each row's last token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
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
        import torch

        _check_lengths(prompts, completions)
        texts = [_conversation_text(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=self.max_length is not None,
                                     max_length=self.max_length, return_tensors="pt", add_special_tokens=True).to(self.device)
                logits = self.model(**enc).logits.float()
                if self.label_index is None:
                    values = logits[:, 0]
                else:
                    values = logits.softmax(-1)[:, self.label_index]
                out += values.cpu().tolist()
        return out


# --- LLM judges over an OpenAI-compatible API ---------------------------------------------------


class ChatClient:
    """POST /chat/completions to an OpenAI-compatible server, with retries and exponential backoff."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0, temperature: float = 0.0,
                 max_tokens: int = 64, sleep: Callable[[float], None] = time.sleep):
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.temperature, self.max_tokens, self.sleep = temperature, max_tokens, sleep
        self.requests = 0  # HTTP attempts made, retries included

    def __repr__(self) -> str:  # never shows the key: it is not stored here at all
        return f"ChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _request(self, messages: list[dict]) -> urllib.request.Request:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        if retry_after:
            try:
                delay = min(self.max_backoff, max(delay, float(retry_after)))
            except ValueError:
                pass
        return delay

    def chat(self, messages: list[dict]) -> str:
        """The assistant's reply text."""
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            self.requests += 1
            try:
                with urllib.request.urlopen(self._request(messages), timeout=self.timeout) as response:
                    payload = response.read()
                try:
                    return json.loads(payload)["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    raise ScoringError(f"the judge at {self.url} answered with something that is not a chat completion: {payload[:200]!r}") from None
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in self.RETRY_STATUS:
                    hint = f" (check the API key in ${self.api_key_env})" if e.code in (401, 403) else ""
                    raise ScoringError(f"the judge at {self.url} refused the request: HTTP {e.code}{hint}: {detail}") from None
                last, retry_after = f"HTTP {e.code}: {detail}", e.headers.get("Retry-After") if e.headers else None
            except urllib.error.URLError as e:
                last = f"{type(e.reason).__name__}: {e.reason}"
            except (TimeoutError, socket.timeout, ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                self.sleep(self._wait(attempt, retry_after))
        raise JudgeUnreachable(
            f"could not get an answer from the judge at {self.url} after {self.max_retries + 1} attempts "
            f"(last error: {last}); is the server running, and are the judge's base_url and model right?"
        )


POINTWISE_TEMPLATE = (
    "Rate how good the response is as a reply to the prompt, on a scale of 1 (worst) to 10 (best). "
    "Answer with the rating only, as 'Rating: N'.\n\n[Prompt]\n{prompt}\n\n[Response]\n{completion}"
)
PAIRWISE_TEMPLATE = (
    "Which response is the better reply to the prompt? Answer with one letter: A or B.\n\n"
    "[Prompt]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}"
)
SYSTEM_PROMPT = "You are an impartial, careful judge of responses."

_RATING = re.compile(r"rating\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?:\s*/\s*10)?")
_CHOICE = re.compile(r"\b(A|B)\b")


def parse_rating(reply: str, low: float = 1.0, high: float = 10.0) -> float:
    """The 1-10 rating in a judge's reply ('Rating: 7', '7/10', '**8**', '7'); NaN if none is in range."""
    for pattern in (_RATING, _NUMBER):
        for match in pattern.finditer(reply):
            value = float(match.group(1))
            if low <= value <= high:
                return value
    return math.nan


def parse_choice(reply: str) -> float:
    """1.0 for A, 0.0 for B, 0.5 for a tie or no readable choice."""
    text = reply.strip()
    if re.search(r"\btie\b|\bequal(ly)?\b", text, re.IGNORECASE) and not re.match(r"^\W*(A|B)\b", text):
        return 0.5
    match = _CHOICE.search(text)
    return 0.5 if match is None else (1.0 if match.group(1) == "A" else 0.0)


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)


def _map(fn: Callable, items: list, workers: int) -> list:
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


class JudgeScorer:
    """Pointwise LLM judge: each completion rated 1-10."""

    def __init__(self, base_url: str, model: str, template: str = POINTWISE_TEMPLATE, system: str = SYSTEM_PROMPT,
                 max_concurrency: int = 4, **client_options):
        self.client = ChatClient(base_url, model, **client_options)
        self.template, self.system, self.max_concurrency = template, system, max_concurrency
        self.unparsed = 0  # replies with no readable rating (scored NaN)
        self.name = f"judge {model} at {self.client.url}"

    def _one(self, item) -> float:
        prompt, completion = item
        reply = self.client.chat([{"role": "system", "content": self.system},
                                  {"role": "user", "content": self.template.format(prompt=_prompt_text(prompt), completion=completion)}])
        value = parse_rating(reply)
        if math.isnan(value):
            self.unparsed += 1
        return value

    def score(self, prompts, completions) -> list[float]:
        _check_lengths(prompts, completions)
        return _map(self._one, list(zip(prompts, completions)), self.max_concurrency)


class PairwiseJudge:
    """Pairwise LLM judge: which of two completions is better."""

    def __init__(self, base_url: str, model: str, template: str = PAIRWISE_TEMPLATE, system: str = SYSTEM_PROMPT,
                 swap: bool = True, max_concurrency: int = 4, **client_options):
        self.client = ChatClient(base_url, model, **client_options)
        self.template, self.system, self.swap, self.max_concurrency = template, system, swap, max_concurrency
        self.name = f"pairwise judge {model} at {self.client.url}"

    def _ask(self, prompt, a, b) -> float:
        reply = self.client.chat([{"role": "system", "content": self.system},
                                  {"role": "user", "content": self.template.format(prompt=_prompt_text(prompt), a=a, b=b)}])
        return parse_choice(reply)

    def _one(self, item) -> float:
        prompt, a, b = item
        first = self._ask(prompt, a, b)
        if not self.swap:
            return first
        return (first + (1.0 - self._ask(prompt, b, a))) / 2

    def compare(self, prompts, completions_a, completions_b) -> list[float]:
        """Per item: 1.0 if A is better, 0.0 if B is, 0.5 for a tie (or the two orders disagreeing)."""
        _check_lengths(prompts, completions_a)
        _check_lengths(prompts, completions_b)
        return _map(self._one, list(zip(prompts, completions_a, completions_b)), self.max_concurrency)


# --- from a spec --------------------------------------------------------------------------------

JUDGE_KEYS = ("base_url", "model", "api_key_env", "timeout", "max_retries", "backoff", "max_backoff", "temperature",
              "max_tokens", "template", "system", "max_concurrency")


def build_scorer(spec: Any) -> Any:
    """A Scorer (or PairwiseJudge) from a spec:

      "module:function" | "path/file.py:function"   -> FunctionScorer
      "rm:PATH_OR_HUB_ID"                           -> RewardModelScorer
      a callable                                    -> FunctionScorer
      {"type": "function", "function": "module:function"}
      {"type": "reward_model", "path": ..., "batch_size": 16, "label": null}
      {"type": "judge", "base_url": "http://127.0.0.1:8000/v1", "model": ..., "mode": "pointwise"|"pairwise",
       "api_key_env": "OPENAI_API_KEY", "max_retries": 4, "timeout": 60, ...}
    """
    if isinstance(spec, (FunctionScorer, RewardModelScorer, JudgeScorer, PairwiseJudge)) or (
        not isinstance(spec, (str, dict)) and hasattr(spec, "score")
    ):
        return spec
    if callable(spec):
        return FunctionScorer(spec)
    if isinstance(spec, str):
        if spec.startswith(("rm:", "reward_model:")):
            return RewardModelScorer(spec.split(":", 1)[1])
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
            return RewardModelScorer(path, **options)
        if kind == "judge":
            mode = options.pop("mode", "pointwise")
            unknown = set(options) - set(JUDGE_KEYS) - {"swap"}
            if unknown or "base_url" not in options or "model" not in options:
                raise ScoringError(f"a judge scorer needs base_url and model (and takes {', '.join(JUDGE_KEYS)}, swap); got {sorted(spec)}")
            if mode == "pairwise":
                return PairwiseJudge(**options)
            if mode != "pointwise":
                raise ScoringError(f"judge mode must be pointwise or pairwise, got {mode!r}")
            options.pop("swap", None)
            return JudgeScorer(**options)
        raise ScoringError(f"scorer type must be function, reward_model or judge; got {kind!r}")
    raise ScoringError(f"cannot build a scorer from {spec!r}")


# --- files --------------------------------------------------------------------------------------


def score_file(in_path: str | Path, out_path: str | Path, scorer, chunk_size: int = 256,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Add a `score` to every row of a samples file, into out_path; resumable (rows already scored are kept).

    Rows are matched by (prompt, sample_index). Returns counts: rows, already_scored, scored, unscored (NaN).
    """
    from dpokit.online.sampling import append_rows, prompt_key, read_samples

    rows = read_samples(in_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(prompt_key(r["prompt"]), r.get("sample_index", 0)) for r in read_samples(out)}
    todo = [r for r in rows if (prompt_key(r["prompt"]), r.get("sample_index", 0)) not in done]
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        scores = scorer.score([r["prompt"] for r in chunk], [r["completion"] for r in chunk])
        append_rows(out, [{**r, "score": (None if s is None or not math.isfinite(s) else float(s))} for r, s in zip(chunk, scores)])
        if progress is not None:
            progress(len(done) + start + len(chunk), len(rows))
    unscored = sum(r.get("score") is None for r in read_samples(out))
    return {"rows": len(rows), "already_scored": len(rows) - len(todo), "scored": len(todo), "unscored": unscored}


SCORE_HELP = """\
Score every completion of a samples file (from `dpokit sample`) and write it with a `score` field.
Rerunning resumes: rows already in --out are not scored again.

  dpokit score --in samples.jsonl --out scored.jsonl --scorer dpokit.demo.world:sentiment
  dpokit score --in samples.jsonl --out scored.jsonl --scorer rm:path/to/reward-model
  dpokit score --in samples.jsonl --out scored.jsonl --judge-url http://127.0.0.1:8000/v1 --judge-model qwen2.5-7b-instruct

--scorer is module:function (a rule-based reward: f(completion), f(prompt, completion), or
f(prompts=..., completions=...)) or rm:MODEL (a sequence-classification reward model).
A judge (--judge-url) rates each completion 1-10 through /v1/chat/completions; its API key
is read from the environment variable named by --api-key-env (default OPENAI_API_KEY).
"""


def add_cli(verbs) -> None:
    import argparse

    p = verbs.add_parser("score", help="score sampled completions (rule, reward model or LLM judge)", description=SCORE_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="in_path", required=True, help="samples JSONL (dpokit sample's output)")
    p.add_argument("--out", required=True, help="scored JSONL (resumable)")
    p.add_argument("--scorer", help="module:function or rm:MODEL")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", help="model name sent to the judge endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key")
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4, help="judge requests in flight")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    if bool(args.scorer) == bool(args.judge_url):
        raise ScoringError("give exactly one of --scorer and --judge-url")
    if args.judge_url:
        if not args.judge_model:
            raise ScoringError("--judge-url needs --judge-model")
        scorer = JudgeScorer(args.judge_url, args.judge_model, api_key_env=args.api_key_env, max_retries=args.max_retries,
                             max_concurrency=args.concurrency)
    else:
        scorer = build_scorer(args.scorer)
    report = score_file(args.in_path, args.out, scorer)
    print(f"[score] {report['scored']} rows scored, {report['already_scored']} already scored, "
          f"{report['unscored']} without a score; written to {args.out}")
    return 0
