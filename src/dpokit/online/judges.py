"""LLM judges behind an OpenAI-compatible /v1/chat/completions endpoint (vLLM, TGI, llama.cpp, OpenAI).

  JudgeScorer    pointwise: the rating in the judge's reply on a 1-10 scale (NaN when the reply states
                 none; counted in `unparsed`).
  PairwiseJudge  comparing two completions (A/B): `compare(prompts, a, b)` -> 1.0 (A better), 0.0
                 (B better), 0.5 (tie), NaN (no verdict; counted in `unparsed`); `swap=True` asks both
                 orders and averages the readable ones, cancelling the judge's position bias. For win rates.
Replies are read by the one grammar of online/judge_grammar.py ("Rating: 7", "[[A]]", ...).

The API key is read from an environment variable (`api_key_env`, default OPENAI_API_KEY) at each
request, sent only in the Authorization header, never stored on the object, logged or put in an
error message. `timeout` bounds each request as a whole; a reply body over MAX_REPLY_BYTES is a failed
request. Failed requests (429, 5xx, timeouts, refused or lost connections, oversized replies) are retried
with exponential backoff (honouring Retry-After); after `max_retries` retries `JudgeUnreachable` says which
URL could not be reached and why. Only the standard library (urllib) is used. Defaults: JudgeConfig.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Callable

from dpokit.config import JudgeConfig
from dpokit.config.flags import Flag
from dpokit.inputs import loads_bounded
from dpokit.online.judge_grammar import parse_rating, parse_verdict
from dpokit.online.prompts import Prompt
from dpokit.online.scorer import JudgeUnreachable, ScoringError, check_lengths

_D = JudgeConfig()  # the defaults, from the one typed config


# A chat completion with a rating or a verdict is a few KiB; a reply body over this is a failed request (retried,
# counted in ChatClient.failed), never read into memory whole.
MAX_REPLY_BYTES = 1 << 20


class _DeadlineSocket:
    """A connected socket whose every send and receive waits at most until `deadline` (time.monotonic()).

    A socket timeout alone bounds each read, so a judge that sends one byte a second never trips it: here
    each read is given only the time left of the whole request, and none is left after the deadline.
    """

    def __init__(self, sock, deadline: float):
        self._sock, self._deadline = sock, deadline

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def time_left(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than the timeout")
        self._sock.settimeout(left)

    def sendall(self, data, *flags):
        self.time_left()
        return self._sock.sendall(data, *flags)

    def makefile(self, mode="rb", *args, **kwargs):  # http.client reads the status, headers and body from it
        return io.BufferedReader(_DeadlineReader(self._sock.makefile("rb", buffering=0), self))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, raw, owner: _DeadlineSocket):
        super().__init__()
        self._raw, self._owner = raw, owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._owner.time_left()
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Deadline:
    """An urllib handler whose connections keep one deadline for the whole request (connect, send, headers, body):
    the request's `deadline` (time.monotonic()), set by ChatClient; one without (a redirect's) gets its timeout."""

    def do_open(self, http_class, req, **kwargs):
        deadline = getattr(req, "deadline", None) or time.monotonic() + req.timeout

        def connection(host, **options):
            options["timeout"] = max(0.001, deadline - time.monotonic())  # connecting spends the same deadline
            conn = http_class(host, **options)
            connect = conn.connect

            def bounded_connect():
                connect()
                conn.sock = _DeadlineSocket(conn.sock, deadline)

            conn.connect = bounded_connect
            return conn

        return super().do_open(connection, req, **kwargs)


class _DeadlineHTTP(_Deadline, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPS(_Deadline, urllib.request.HTTPSHandler):
    pass


class _ReplyTooLarge(Exception):
    pass


def _read_reply(response) -> bytes:
    """The body, at most MAX_REPLY_BYTES of it (a larger one is refused, unread where its length is declared)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
        raise _ReplyTooLarge(f"a reply of {int(declared)} bytes, over the {MAX_REPLY_BYTES} allowed")
    payload = response.read(MAX_REPLY_BYTES + 1)
    if len(payload) > MAX_REPLY_BYTES:
        raise _ReplyTooLarge(f"a reply over the {MAX_REPLY_BYTES} bytes allowed")
    return payload


class ChatClient:
    """POST /chat/completions to an OpenAI-compatible server, with retries and exponential backoff.

    `timeout` bounds each attempt as a whole (connecting, sending, the headers and the body), not each socket read;
    so one call takes at most (max_retries + 1) * timeout plus the backoff waits between attempts.
    """

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = _D.api_key_env,
        timeout: float = _D.timeout,
        max_retries: int = _D.max_retries,
        backoff: float = _D.backoff,
        max_backoff: float = _D.max_backoff,
        temperature: float = _D.temperature,
        max_tokens: int = _D.max_tokens,
        sleep: Callable[[float], None] = time.sleep,
    ):
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.temperature, self.max_tokens, self.sleep = temperature, max_tokens, sleep
        self.requests = 0  # HTTP attempts made, retries included
        self.failed = 0  # failed attempts: timeouts, lost connections, 429/5xx, oversized replies
        self._opener = urllib.request.build_opener(_DeadlineHTTP, _DeadlineHTTPS)

    def __repr__(self) -> str:  # never shows the key: it is not stored here at all
        return f"ChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _request(self, messages: list[dict]) -> urllib.request.Request:
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}
        ).encode()
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

    def _post(self, messages: list[dict]) -> bytes:
        """One attempt: the reply body, within `timeout` from now."""
        request = self._request(messages)
        request.deadline = time.monotonic() + self.timeout
        with self._opener.open(request, timeout=self.timeout) as response:
            return _read_reply(response)

    def chat(self, messages: list[dict]) -> str:
        """The assistant's reply text."""
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            self.requests += 1
            try:
                payload = self._post(messages)
                try:
                    content = loads_bounded(payload)["choices"][0]["message"]["content"]
                    # a reply that is not text (null, a number, a list) reads as no reply: unscored and counted
                    return content if isinstance(content, str) else ""
                except (ValueError, KeyError, IndexError, TypeError):  # ValueError: JSONDecodeError, too deep
                    raise ScoringError(
                        f"the judge at {self.url} answered with something that is not a chat completion: {payload[:200]!r}"
                    ) from None
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read(300).decode("utf-8", "replace")
                except (OSError, http.client.HTTPException):
                    detail = ""
                if e.code not in self.RETRY_STATUS:
                    hint = f" (check the API key in ${self.api_key_env})" if e.code in (401, 403) else ""
                    raise ScoringError(
                        f"the judge at {self.url} refused the request: HTTP {e.code}{hint}: {detail}"
                    ) from None
                last, retry_after = f"HTTP {e.code}: {detail}", e.headers.get("Retry-After") if e.headers else None
            except urllib.error.URLError as e:
                last = f"{type(e.reason).__name__}: {e.reason}"
            except (OSError, http.client.HTTPException, _ReplyTooLarge) as e:  # timeouts, lost or garbled replies
                last = f"{type(e).__name__}: {e}"
            self.failed += 1
            if attempt < self.max_retries:
                self.sleep(self._wait(attempt, retry_after))
        raise JudgeUnreachable(
            f"could not get an answer from the judge at {self.url} after {self.max_retries + 1} attempts "
            f"(last error: {last}); is the server running, and are the judge's base_url and model right?"
        )


def judge_flags(url_help: str) -> tuple[Flag, ...]:
    """The flags of a judge behind an API, the same on every verb that asks one (score, eval): aliases of judge.*."""
    return (
        Flag(("--judge-url",), "judge.base_url", url_help),
        Flag(("--judge-model",), "judge.model", "model name sent to the judge endpoint"),
        Flag(("--api-key-env",), "judge.api_key_env", "environment variable holding the judge's API key"),
        Flag(("--timeout",), "judge.timeout", "seconds one judge request may take in all, reply included"),
        Flag(("--max-retries",), "judge.max_retries", "retries of a failed judge request"),
    )


def judge_options(judge: JudgeConfig) -> dict:
    """The ChatClient options of a config's judge section, checked before anything is loaded or asked."""
    if judge.base_url and not judge.model:
        raise ScoringError("--judge-url needs --judge-model (judge.base_url needs judge.model)")
    if not judge.timeout > 0 or judge.max_retries < 0:
        raise ScoringError(
            f"--timeout must be > 0 and --max-retries >= 0 (judge.timeout, judge.max_retries), "
            f"got {judge.timeout:g} and {judge.max_retries}"
        )
    return {"api_key_env": judge.api_key_env, "timeout": judge.timeout, "max_retries": judge.max_retries}


POINTWISE_TEMPLATE = (
    "Rate how good the response is as a reply to the prompt, on a scale of 1 (worst) to 10 (best). "
    "Answer with the rating only, as 'Rating: N'.\n\n[Prompt]\n{prompt}\n\n[Response]\n{completion}"
)
PAIRWISE_TEMPLATE = (
    'Which response is the better reply to the prompt? Answer with the verdict only: "[[A]]" if response A is '
    'better, "[[B]]" if response B is better, "[[C]]" for a tie.\n\n'
    "[Prompt]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}"
)
SYSTEM_PROMPT = "You are an impartial, careful judge of responses."


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

    def __init__(
        self,
        base_url: str,
        model: str,
        template: str = POINTWISE_TEMPLATE,
        system: str = SYSTEM_PROMPT,
        max_concurrency: int = _D.max_concurrency,
        **client_options,
    ):
        self.client = ChatClient(base_url, model, **client_options)
        self.template, self.system, self.max_concurrency = template, system, max_concurrency
        self.unparsed = 0  # replies with no readable rating (scored NaN)
        self.name = f"judge {model} at {self.client.url}"

    def _one(self, item) -> float:
        prompt, completion = item
        reply = self.client.chat(
            [
                {"role": "system", "content": self.system},
                {"role": "user", "content": self.template.format(prompt=_prompt_text(prompt), completion=completion)},
            ]
        )
        value = parse_rating(reply)
        if math.isnan(value):
            self.unparsed += 1
        return value

    def score(self, prompts, completions) -> list[float]:
        check_lengths(prompts, completions)
        return _map(self._one, list(zip(prompts, completions)), self.max_concurrency)


class PairwiseJudge:
    """Pairwise LLM judge: which of two completions is better."""

    def __init__(
        self,
        base_url: str,
        model: str,
        template: str = PAIRWISE_TEMPLATE,
        system: str = SYSTEM_PROMPT,
        swap: bool = _D.swap,
        max_concurrency: int = _D.max_concurrency,
        **client_options,
    ):
        self.client = ChatClient(base_url, model, **client_options)
        self.template, self.system, self.swap, self.max_concurrency = template, system, swap, max_concurrency
        self.unparsed = 0  # replies with no readable choice (that order counts as unjudged)
        self.name = f"pairwise judge {model} at {self.client.url}"

    def _ask(self, prompt, a, b) -> float:
        reply = self.client.chat(
            [
                {"role": "system", "content": self.system},
                {"role": "user", "content": self.template.format(prompt=_prompt_text(prompt), a=a, b=b)},
            ]
        )
        value = parse_verdict(reply)
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
