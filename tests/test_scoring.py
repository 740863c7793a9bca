"""Scorers: a rule function, a tiny reward model, and an LLM judge behind a local OpenAI-compatible server."""

from __future__ import annotations

import json
import logging
import math
import socket

import pytest
import torch

from dpokit.online.judge_grammar import parse_rating, parse_verdict
from dpokit.online.judges import ChatClient, JudgeScorer, PairwiseJudge
from dpokit.online.scorer import JudgeUnreachable, ScoringError
from dpokit.online.scoring import FunctionScorer, RewardModelScorer, build_scorer, score_file
from chat_server import ChatServer
from tiny_assets import word_tokenizer


PROMPTS = ["the film was", "the movie was", "it is"]
COMPLETIONS = [" wonderful and i loved it", " awful and dull", " long"]


# --- rule-based -----------------------------------------------------------------------------------


def test_rule_scorer_from_a_module_function():
    scorer = build_scorer("dpokit.demo.world:sentiment")
    assert isinstance(scorer, FunctionScorer)
    assert scorer.score(PROMPTS, COMPLETIONS) == [1.0, 0.0, 0.5]


def test_function_signatures_and_files(tmp_path):
    module = tmp_path / "rewards.py"
    module.write_text(
        "def two(prompt, completion):\n    return len(prompt) + len(completion)\n"
        "def batched(prompts, completions, **kwargs):\n    return [float(c.count('a')) for c in completions]\n"
        "def broken(completion):\n    return None\n"
    )
    assert FunctionScorer(f"{module}:two").score(["ab"], ["cde"]) == [5.0]
    assert FunctionScorer(f"{module}:batched").score(PROMPTS, COMPLETIONS) == [1.0, 2.0, 0.0]
    assert math.isnan(FunctionScorer(f"{module}:broken").score(["x"], ["y"])[0])
    assert FunctionScorer(lambda c: len(c)).score(["p"], ["abc"]) == [3.0]
    for bad in ("nocolon", "dpokit.demo.world:nope", "no_such_module_xyz:f", f"{tmp_path}/missing.py:f"):
        with pytest.raises(ScoringError):
            build_scorer(bad)


# --- reward models --------------------------------------------------------------------------------


def _tiny_reward_model(path, num_labels=1, id2label=None):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        num_labels=num_labels,
        id2label=id2label,
        label2id=None if id2label is None else {v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_tiny_reward_model_scores_a_sample(tmp_path):
    path = _tiny_reward_model(tmp_path / "rm")
    scorer = build_scorer(f"rm:{path}")
    assert isinstance(scorer, RewardModelScorer) and scorer.label_index is None
    prompts = ["the film was", "the movie was", "it is", "the plot was"]
    completions = [" good", " very bad and awful", " fine", " great acting and a good plot"]
    scores = scorer.score(prompts, completions)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores) and len(set(scores)) == 4
    # Padding must not change a score: alone (no padding) == in a right-padded batch.
    scorer.batch_size = 1
    assert scorer.score(prompts, completions) == pytest.approx(scores, abs=1e-5)


def test_two_label_reward_model_gives_the_positive_probability(tmp_path):
    path = _tiny_reward_model(tmp_path / "rm2", num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    scorer = build_scorer({"type": "reward_model", "path": path})
    assert scorer.label_index == 1
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert all(0.0 < s < 1.0 for s in scores)
    negative = build_scorer({"type": "reward_model", "path": path, "label": "negative"}).score(PROMPTS, COMPLETIONS)
    assert [a + b for a, b in zip(scores, negative)] == pytest.approx([1.0] * 3, abs=1e-5)


def test_missing_reward_model_is_a_clear_error(tmp_path):
    with pytest.raises(ScoringError, match="could not load the reward model"):
        build_scorer(f"rm:{tmp_path / 'nothing-here'}")


# --- LLM judge over a local OpenAI-compatible server ---------------------------------------------


class JudgeServer(ChatServer):
    """A tiny /v1/chat/completions server on 127.0.0.1 that plays a judge.

    Pointwise: "Rating: N" with N = 9 if the response has a positive word, 2 otherwise.
    Pairwise: the verdict "[[A]]" or a last line "Verdict: B", whichever response has the positive word.
    `failures` is a list of (status, headers) answered, in order, before the normal replies.
    """

    def __init__(self):
        super().__init__()
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.failures: list[tuple[int, dict]] = []

    def respond(self, body, request):
        self.requests.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if request.path != "/v1/chat/completions":
            return 404, {"error": "not found"}, {}
        if self.failures:
            status, headers = self.failures.pop(0)
            return status, {"error": {"message": "try again"}}, headers
        text = body["messages"][-1]["content"]
        if "[Response A]" in text:
            a = text.split("[Response A]")[1].split("[Response B]")[0]
            return self.reply("[[A]]" if "wonderful" in a or "great" in a else "A is weaker.\nVerdict: B")
        response = text.split("[Response]")[1]
        return self.reply("Rating: 9" if ("wonderful" in response or "great" in response) else "I would say 2/10.")


def test_pointwise_judge_scores_a_sample_and_sends_the_key(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    with JudgeServer() as server:
        judge = JudgeScorer(server.url, "judge-model", api_key_env="MY_JUDGE_KEY", max_concurrency=2)
        assert judge.score(PROMPTS, COMPLETIONS) == [9.0, 2.0, 2.0]
    assert len(server.requests) == 3 and all(r["model"] == "judge-model" for r in server.requests)
    assert server.auth == ["Bearer sk-secret-123"] * 3
    assert "sk-secret" not in repr(judge.client) and "sk-secret" not in json.dumps(vars(judge.client), default=str)


def test_no_key_sends_no_authorization_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with JudgeServer() as server:
        JudgeScorer(server.url, "m").score(["p"], [" great"])
    assert server.auth == [None]


def test_judge_retries_after_500_and_429_with_backoff(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-456")
    waits = []
    with JudgeServer() as server:
        server.failures = [(500, {}), (429, {"Retry-After": "3"}), (503, {})]
        judge = JudgeScorer(server.url, "m", max_retries=3, backoff=0.5, sleep=waits.append, max_concurrency=1)
        with caplog.at_level(logging.DEBUG):
            assert judge.score(["the film was"], [" wonderful"]) == [9.0]
    assert len(server.requests) == 4 and judge.client.requests == 4
    assert waits == [0.5, 3.0, 2.0]  # 0.5 * 2**attempt, Retry-After honoured when longer
    assert "sk-secret" not in caplog.text


def test_judge_gives_up_after_max_retries_with_a_clear_error():
    waits = []
    with JudgeServer() as server:
        server.failures = [(500, {})] * 5
        judge = JudgeScorer(server.url, "m", max_retries=2, sleep=waits.append)
        with pytest.raises(JudgeUnreachable, match=r"after 3 attempts.*HTTP 500"):
            judge.score(["p"], [" x"])
    assert len(waits) == 2


def test_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-789")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits = []
    judge = JudgeScorer(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff=1.0, sleep=waits.append, timeout=2)
    with pytest.raises(JudgeUnreachable) as info:
        judge.score(["p"], [" x"])
    message = str(info.value)
    assert (
        f"127.0.0.1:{port}/v1/chat/completions" in message
        and "after 3 attempts" in message
        and "server running" in message
    )
    assert "sk-secret" not in message
    assert waits == [1.0, 2.0]


def test_client_errors_are_not_retried(monkeypatch):
    with JudgeServer() as server:
        server.failures = [(401, {})]
        with pytest.raises(ScoringError, match=r"HTTP 401 \(check the API key in \$OPENAI_API_KEY\)"):
            ChatClient(server.url, "m", sleep=lambda s: None).chat([{"role": "user", "content": "hi"}])
        assert len(server.requests) == 1


def test_pairwise_judge_cancels_position_bias():
    with JudgeServer() as server:
        judge = build_scorer({"type": "judge", "mode": "pairwise", "base_url": server.url, "model": "m"})
        assert isinstance(judge, PairwiseJudge)
        # The server answers "B" whenever neither response is positive: asked both ways, that bias cancels to a tie.
        assert judge.compare(["p", "p", "p"], [" wonderful", " dull", " fine"], [" dull", " great", " long"]) == [
            1.0,
            0.0,
            0.5,
        ]
        assert len(server.requests) == 6  # both orders asked
        judge.swap = False
        assert judge.compare(["p", "p"], [" wonderful", " fine"], [" dull", " long"]) == [1.0, 0.0]


def test_reply_parsing():  # the whole grammar: tests/test_judge_grammar.py
    assert parse_rating("Rating: 7") == 7.0
    assert parse_rating("I'd give it **8**/10") == 8.0
    assert math.isnan(parse_rating("Rating: 12. Sorry, I meant 6"))  # the last rating statement is out of range
    assert math.isnan(parse_rating("no idea"))
    assert parse_verdict("[[A]]") == 1.0 and parse_verdict("Response B is better.\nVerdict: B") == 0.0
    assert parse_verdict("[[C]]") == 0.5 and math.isnan(parse_verdict("???")) and math.isnan(parse_verdict("A"))


def test_an_unreadable_pairwise_verdict_is_unjudged_not_a_tie():
    """A reply with no choice was read as a tie (0.5), which pulls every win rate toward 50% without a word."""
    judge = PairwiseJudge("http://127.0.0.1:9/v1", "m", max_concurrency=1)  # one at a time: the replies come in order
    replies = iter(["I cannot decide.", "no comment", "[[A]]", "no comment", "???", "[[B]]"])
    judge.client.chat = lambda messages: next(replies)
    # item 1: neither order readable -> NaN; item 2: only the first order ([[A]]) -> 1.0; item 3: only the swapped one ([[B]] -> A)
    wins = judge.compare(["p"] * 3, ["a1", "a2", "a3"], ["b1", "b2", "b3"])
    assert math.isnan(wins[0]) and wins[1:] == [1.0, 1.0] and judge.unparsed == 4


def test_a_negative_rating_is_unscored_not_read_without_its_sign():
    """Issue 15: 'Rating: -3' became 3.0. A negative is out of the 1-10 range, so it counts as unscored."""
    for reply in (
        "Rating: -3",
        "rating = -3",
        "Rating: **-3**",
        "-3",
        "I'd say -3/10",
        "Rating: \u22123",
        "Rating: -7.5",
    ):
        assert math.isnan(parse_rating(reply)), reply
    assert parse_rating("Rating: -3. Sorry, I meant Rating: 6") == 6.0  # the last rating statement counts
    assert (
        math.isnan(parse_rating("Rating: 7-8")) and parse_rating("a 1-10 scale; Rating: 4") == 4.0
    )  # a dash is no sign
    judge = JudgeScorer("http://127.0.0.1:9/v1", "m")
    judge.client.chat = lambda messages: "Rating: -3"
    assert all(math.isnan(v) for v in judge.score(PROMPTS, COMPLETIONS)) and judge.unparsed == 3


def test_score_file_adds_scores_and_resumes(tmp_path):
    rows = [{"prompt": p, "sample_index": 0, "completion": c} for p, c in zip(PROMPTS, COMPLETIONS)]
    src = tmp_path / "samples.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []

    class Counting:
        def score(self, prompts, completions):
            calls.append(len(completions))
            return [float(len(c)) for c in completions]

    out = tmp_path / "scored.jsonl"
    first = score_file(src, out, Counting(), chunk_size=2)
    assert first == {"rows": 3, "already_scored": 0, "scored": 3, "unscored": 0} and calls == [2, 1]
    again = score_file(src, out, Counting())
    assert again["scored"] == 0 and again["already_scored"] == 3 and calls == [2, 1]
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in scored] == [float(len(c)) for c in COMPLETIONS]


# --- dpokit score: request timeout and progress (issue 15) ----------------------------------------


def _samples_file(tmp_path, n=3):
    rows = [{"prompt": p, "sample_index": 0, "completion": c} for p, c in zip(PROMPTS[:n], COMPLETIONS[:n])]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_score_timeout_and_retries_bound_the_wait_for_a_silent_judge(tmp_path, capsys):
    import time

    from dpokit.cli import main

    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        started = time.time()
        status = main(
            [
                "score",
                "--in",
                str(_samples_file(tmp_path, 1)),
                "--out",
                str(tmp_path / "scored.jsonl"),
                "--judge-url",
                url,
                "--judge-model",
                "m",
                "--timeout",
                "0.3",
                "--max-retries",
                "0",
            ]
        )
        elapsed = time.time() - started
    assert status == 2 and elapsed < 10, elapsed  # the defaults (60 s x 5 attempts) would take about 5 minutes
    assert "after 1 attempts" in capsys.readouterr().err


def test_cli_score_prints_progress_with_a_count_and_an_eta(tmp_path, capsys, monkeypatch):
    from dpokit.cli import main
    import dpokit.online.scoring

    monkeypatch.setattr(dpokit.online.scoring, "SCORE_CHUNK_SIZE", 2)
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(completion):\n    return len(completion)\n")
    assert (
        main(
            [
                "score",
                "--in",
                str(_samples_file(tmp_path)),
                "--out",
                str(tmp_path / "scored.jsonl"),
                "--scorer",
                f"{rewards}:length",
            ]
        )
        == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[score] ") and "/3 rows" in line]
    assert [line.split()[1] for line in lines] == ["0/3", "2/3", "3/3"], lines
    assert "left" in lines[1] and "s elapsed" in lines[1]
