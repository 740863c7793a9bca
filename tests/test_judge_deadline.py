"""A judge request ends by its timeout as a whole, and its reply body is capped (issue 20): against servers on
127.0.0.1 that send their answer one byte at a time, or 50 MB of it.

Before: `--timeout` bounded each socket read, so a judge dripping one byte a second held one request for 268 s
under `--timeout 3 --max-retries 0`, and a 50 MB reply was read whole (816 MB of memory).
"""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from dpokit.online.judges import MAX_REPLY_BYTES, ChatClient
from dpokit.online.scorer import JudgeUnreachable
from chat_server import DripServer, HugeReplyServer

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers"])
def test_a_dripping_reply_ends_at_the_timeout(headers_too):
    # Each byte comes well within the timeout (0.2 s apart), so only a deadline on the whole request stops it.
    with DripServer(interval=0.2, headers_too=headers_too) as server:
        client = ChatClient(server.url, "m", timeout=1.0, max_retries=0)
        started = time.monotonic()
        with pytest.raises(JudgeUnreachable, match=r"after 1 attempts \(last error: .*(Timeout|timed out)"):
            client.chat(HI)
        elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.0, elapsed  # the server would go on for 10 s
    assert client.requests == 1 and client.failed == 1


def test_each_retry_gets_the_timeout_and_the_backoff_waits_come_between():
    waits = []
    with DripServer(interval=0.2) as server:
        client = ChatClient(server.url, "m", timeout=1.0, max_retries=1, backoff=0.5, sleep=waits.append)
        started = time.monotonic()
        with pytest.raises(JudgeUnreachable, match="after 2 attempts"):
            client.chat(HI)
        elapsed = time.monotonic() - started
    assert 1.9 < elapsed < 3.0, elapsed  # (max_retries + 1) x timeout; the backoff wait was recorded, not slept
    assert waits == [0.5] and client.requests == 2 and client.failed == 2


@pytest.mark.parametrize("declare", [False, True], ids=["streamed", "declared"])
def test_a_huge_reply_is_a_failed_request_read_no_further_than_the_cap(declare):
    with HugeReplyServer(size=50 << 20, declare=declare) as server:
        client = ChatClient(server.url, "m", timeout=10.0, max_retries=0)
        tracemalloc.start()
        try:
            with pytest.raises(JudgeUnreachable, match=rf"after 1 attempts \(last error: .*over the {MAX_REPLY_BYTES}"):
                client.chat(HI)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert client.failed == 1
    assert peak < 3 * MAX_REPLY_BYTES, peak  # the whole reply would be 50 MB
    assert server.sent < 25 << 20  # the client hung up: what was sent is what the socket buffers took


def test_a_reply_just_under_the_cap_is_read():
    text = "Rating: 7 " + "x" * (MAX_REPLY_BYTES - 200)

    class Big(DripServer):
        def send(self, request, status, data, headers):
            data = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            assert len(data) <= MAX_REPLY_BYTES
            request.wfile.write(f"HTTP/1.0 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)

    with Big() as server:
        assert ChatClient(server.url, "m", timeout=10.0, max_retries=0).chat(HI) == text


def test_dpokit_eval_passes_timeout_and_max_retries_to_its_judges(tmp_path, monkeypatch, capsys):
    import dpokit.online.evaluation as evaluation
    from dpokit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the film was"}\n')
    made = []
    monkeypatch.setattr(evaluation, "load_model", lambda name, trust: (name, None))
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: {})
    for cls in ("PairwiseJudge", "MTBenchJudge"):
        real = getattr(evaluation, cls)
        monkeypatch.setattr(evaluation, cls, lambda *a, real=real, **kw: made.append(real(*a, **kw)) or made[-1])
    argv = [
        "eval",
        "--policy",
        "p",
        "--prompts",
        str(prompts),
        "--judge-url",
        "http://127.0.0.1:9/v1",
        "--judge-model",
        "m",
    ]
    assert main(argv + ["--timeout", "2.5", "--max-retries", "0"]) == 0
    assert len(made) == 2 and all(j.client.timeout == 2.5 and j.client.max_retries == 0 for j in made)
    assert main(argv + ["--timeout", "0"]) == 2 and "--timeout must be > 0" in capsys.readouterr().err
