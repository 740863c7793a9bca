"""LLM judges behind an OpenAI-compatible /v1/chat/completions endpoint (vLLM, TGI, llama.cpp, OpenAI).

  JudgeScorer    pointwise: a 1-10 rating parsed from the judge's reply (NaN when no rating can be
                 read; counted in `unparsed`).
  PairwiseJudge  comparing two completions (A/B): `compare(prompts, a, b)` -> 1.0 (A better), 0.0
                 (B better), 0.5 (tie), NaN (no readable verdict; counted in `unparsed`); `swap=True`
                 asks both orders and averages the readable ones, cancelling the judge's position bias.
                 For win rates.

The API key is read from an environment variable (`api_key_env`, default OPENAI_API_KEY) at each
request, sent only in the Authorization header, never stored on the object, logged or put in an
error message. Requests are retried with exponential backoff on 429, 5xx, timeouts and refused
connections (honouring Retry-After); after `max_retries` retries `JudgeUnreachable` says which URL
could not be reached and why. Only the standard library (urllib) is used. Defaults: JudgeConfig.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Callable

from dpokit.config import JudgeConfig
from dpokit.online.prompts import Prompt
from dpokit.online.scorer import JudgeUnreachable, ScoringError, check_lengths

_D = JudgeConfig()  # the defaults, from the one typed config


class ChatClient:
    """POST /chat/completions to an OpenAI-compatible server, with retries and exponential backoff."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key_env: str = _D.api_key_env, timeout: float = _D.timeout,
                 max_retries: int = _D.max_retries, backoff: float = _D.backoff, max_backoff: float = _D.max_backoff,
                 temperature: float = _D.temperature, max_tokens: int = _D.max_tokens, sleep: Callable[[float], None] = time.sleep):
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

# A number keeps its sign (ASCII or Unicode minus): "Rating: -3" is -3, out of range, not 3. A number
# right after a sign, a digit or a slash is not read on its own (the 3 of "-3", the 8 of the range "7-8",
# the 5 of "4/5"). A rating out of another scale ("4/5") is not read as a 1-10 rating: it is unscored.
_SIGNED = r"([-+\u2212]?\d+(?:\.\d+)?)"
_OUT_OF = r"(?:\**\s*/\s*(\d+(?:\.\d+)?))?"
_RATING = re.compile(r"rating\s*[:=]?\s*\**\s*" + _SIGNED + _OUT_OF, re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.+\-\u2212/])" + _SIGNED + _OUT_OF)
_CHOICE = re.compile(r"\b(A|B)\b")
# Where a judge names its choice: MT-Bench's "[[A]]" ("[[C]]" a tie), "Response B", "the answer is A".
_BRACKETED = re.compile(r"\[\[\s*(A|B|C)\s*\]\]")
_NAMED = re.compile(r"\b(?i:response|answer|output|assistant|option|choice|winner)(?:\s+(?i:is))?\s*:?\s*\(?(A|B)\)?(?![\w'])")
# "A" the article ("A better answer is B"): a capital A followed by a lower-case word that is not a verb of the choice.
_ARTICLE = re.compile(r"A\s+(?!(?:is|was|wins|seems|looks|has|does|clearly|provides|gives|answers)\b)[a-z]")


def parse_rating(reply: str, low: float = 1.0, high: float = 10.0) -> float:
    """The 1-10 rating in a judge's reply ('Rating: 7', '7/10', '**8**', '7'); NaN if none is in range
    (a negative rating is out of range: unscored, like 11; so is a rating out of another scale, '4/5')."""
    for pattern in (_RATING, _NUMBER):
        for match in pattern.finditer(reply):
            value = float(match.group(1).replace("\u2212", "-"))
            if match.group(2) is not None and float(match.group(2)) != high:
                continue
            if low <= value <= high:
                return value
    return math.nan


def parse_choice(reply: str) -> float:
    """1.0 for A, 0.0 for B, 0.5 for a tie; NaN for no readable choice (unjudged: never read as a tie).

    Read in order: an MT-Bench verdict "[[A]]" / "[[B]]" / "[[C]]" (tie); a named choice ("Response B",
    "the answer is A"); a tie; the first standalone A or B that is not the article ("A better answer is B" is B).
    """
    text = reply.strip()
    bracketed = _BRACKETED.search(text)
    if bracketed:
        return {"A": 1.0, "B": 0.0, "C": 0.5}[bracketed.group(1)]
    named = _NAMED.search(text)
    if named:
        return 1.0 if named.group(1) == "A" else 0.0
    if re.search(r"\btie\b|\bequal(ly)?\b", text, re.IGNORECASE) and not re.match(r"^\W*(A|B)\b", text):
        return 0.5
    for match in _CHOICE.finditer(text):
        if match.group(1) == "A" and _ARTICLE.match(text, match.start()):
            continue
        return 1.0 if match.group(1) == "A" else 0.0
    return math.nan


def both_orders(first: float, swapped: float) -> float:
    """A verdict asked both ways (`swapped`: with A and B exchanged) -> for A: the mean of the readable orders,
    which cancels a position bias when both are read; NaN when neither is."""
    verdicts = [v for v in (first, 1.0 - swapped) if not math.isnan(v)]
    return sum(verdicts) / len(verdicts) if verdicts else math.nan


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
                 max_concurrency: int = _D.max_concurrency, **client_options):
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
        check_lengths(prompts, completions)
        return _map(self._one, list(zip(prompts, completions)), self.max_concurrency)


class PairwiseJudge:
    """Pairwise LLM judge: which of two completions is better."""

    def __init__(self, base_url: str, model: str, template: str = PAIRWISE_TEMPLATE, system: str = SYSTEM_PROMPT,
                 swap: bool = _D.swap, max_concurrency: int = _D.max_concurrency, **client_options):
        self.client = ChatClient(base_url, model, **client_options)
        self.template, self.system, self.swap, self.max_concurrency = template, system, swap, max_concurrency
        self.unparsed = 0  # replies with no readable choice (that order counts as unjudged)
        self.name = f"pairwise judge {model} at {self.client.url}"

    def _ask(self, prompt, a, b) -> float:
        reply = self.client.chat([{"role": "system", "content": self.system},
                                  {"role": "user", "content": self.template.format(prompt=_prompt_text(prompt), a=a, b=b)}])
        value = parse_choice(reply)
        if math.isnan(value):
            self.unparsed += 1
        return value

    def _one(self, item) -> float:
        prompt, a, b = item
        first = self._ask(prompt, a, b)
        if not self.swap:
            return first
        return both_orders(first, self._ask(prompt, b, a))

    def compare(self, prompts, completions_a, completions_b) -> list[float]:
        """Per item: 1.0 if A is better, 0.0 if B is, 0.5 for a tie (or the two orders disagreeing), averaged over
        the orders whose reply was readable; NaN (unjudged, left out of win rates) when none was."""
        check_lengths(prompts, completions_a)
        check_lengths(prompts, completions_b)
        return _map(self._one, list(zip(prompts, completions_a, completions_b)), self.max_concurrency)
