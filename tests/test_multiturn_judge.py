"""MT-Bench-style two-turn judging against a judge on 127.0.0.1, one of whose answers is malformed."""

from __future__ import annotations

import json
import math

import pytest

from dpokit.online.suites.answers import answer
from dpokit.online.suites.multiturn import (
    DEFAULT_QUESTIONS,
    MTBenchJudge,
    QuestionsError,
    converse,
    load_questions,
    score_pairwise,
    score_single,
)
from chat_server import ChatServer
from tiny_assets import model, tokenizer  # noqa: F401  (pytest fixtures)


class MTJudgeServer(ChatServer):
    """A /v1/chat/completions judge on 127.0.0.1.

    Single ratings: "Rating: [[9]]" when the judged answer has the word "great", [[3]] otherwise; a question that
    mentions "broken" gets a reply with no rating at all. Pairwise: always "[[A]]" (a pure position bias) unless
    exactly one of the answers says "great", then that one.
    """

    def __init__(self):
        super().__init__()
        self.requests: list[str] = []
        self.max_tokens: list[int] = []

    def respond(self, body, request):
        text = body["messages"][-1]["content"]
        self.requests.append(text)
        self.max_tokens.append(body["max_tokens"])
        if "[Assistant A]" in text:
            a, b = text.split("[Assistant A]")[1].split("[Assistant B]")
            return self.reply("[[B]]" if ("great" in b and "great" not in a) else "B is fine but my verdict: [[A]]")
        if "broken" in text:
            return self.reply("I cannot rate this answer, it is outside my competence.")
        judged = text.rsplit("### Assistant", 1)[1]
        return self.reply("Clear and correct. Rating: [[9]]" if "great" in judged else "Vague. Rating: [[3]]")


QUESTIONS = [
    {"question_id": 1, "category": "x", "turns": ["say something", "say more"]},
    {"question_id": 2, "category": "x", "turns": ["is it broken", "and now"]},
    {"question_id": 3, "category": "x", "turns": ["describe it", "again"]},
]
# turn 1, turn 2 answers; hand-worked ratings: q1 [9, 3], q2 [unparsed, unparsed], q3 [3, 9]
CONVERSATIONS = [["a great film", "fine"], ["a great film", "great"], ["bad", "great"]]


def test_single_mode_rates_each_turn_and_counts_the_malformed_answers():
    with MTJudgeServer() as server:
        judge = MTBenchJudge(server.url, "judge", max_retries=0)
        out = score_single(judge, QUESTIONS, CONVERSATIONS)
    assert out["parse_failures"] == 2 and out["num_questions"] == 3  # q2's two replies had no rating: counted
    assert out["turn1_score"] == pytest.approx(6.0) and out["turn2_score"] == pytest.approx(6.0)  # (9+3)/2, (3+9)/2
    assert out["score"] == pytest.approx(6.0) and out["score_sem"] == pytest.approx(
        3.0 / math.sqrt(4) * math.sqrt(4 / 3)
    )
    assert math.isnan(out["per_question"][1]["ratings"][0]) and "cannot rate" in out["per_question"][1]["rationales"][0]
    assert out["per_question"][0]["rationales"][0].startswith("Clear and correct")
    # turn 2 is judged with the conversation so far: the question and answer of turn 1 come first
    turn2 = server.requests[1]
    assert "second user question" in turn2 and turn2.index("say something") < turn2.index("a great film") < turn2.index(
        "say more"
    )


def test_the_rating_judge_has_room_for_its_rationale_before_the_rating():
    """MT-Bench's judge explains, then rates: 64 tokens (the pointwise default) cut replies before 'Rating: [[N]]'."""
    with MTJudgeServer() as server:
        score_single(MTBenchJudge(server.url, "judge", max_retries=0), QUESTIONS[:1], CONVERSATIONS[:1])
        score_single(MTBenchJudge(server.url, "judge", max_retries=0, max_tokens=200), QUESTIONS[:1], CONVERSATIONS[:1])
    assert server.max_tokens == [1024, 1024, 200, 200]


def test_pairwise_mode_swaps_positions_so_a_position_bias_cancels():
    policy = [["great", "great"], ["meh", "meh"]]
    baseline = [["meh", "meh"], ["meh", "meh"]]
    with MTJudgeServer() as server:
        judge = MTBenchJudge(server.url, "judge", max_retries=0)
        out = score_pairwise(judge, QUESTIONS[:1] + QUESTIONS[2:], policy, baseline)
    assert len(server.requests) == 8  # 2 questions x 2 turns x both orders
    # q1: the policy's "great" wins in both orders (1); q3: equal answers, the judge always says A -> 1/2 after the swap
    assert out["turn1_win_rate"] == pytest.approx(0.75) and out["turn2_win_rate"] == pytest.approx(0.75)
    assert out["parse_failures"] == 0 and out["unjudged"] == 0 and out["win_rate_sem"] > 0


def test_the_model_answers_turn_2_after_its_own_turn_1(model, tokenizer):  # noqa: F811
    questions = load_questions(max_questions=2)
    conversations = converse(model, tokenizer, questions, max_new_tokens=6)
    assert len(conversations) == 2 and all(len(c) == 2 for c in conversations)
    for question, (first, second) in zip(questions, conversations):
        history = [
            {"role": "user", "content": question["turns"][0]},
            {"role": "assistant", "content": first},
            {"role": "user", "content": question["turns"][1]},
        ]
        # greedy: asking turn 2 by hand with the model's own turn-1 answer gives the same answer
        assert answer(model, tokenizer, [history], max_new_tokens=6, seed=1)[0].completion.strip() == second


def test_question_files(tmp_path):
    assert len(load_questions()) == 10 and DEFAULT_QUESTIONS.exists()
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"turns": ["one", "two"]}) + "\n" + json.dumps({"turns": ["only one"]}) + "\n")
    with pytest.raises(QuestionsError, match=r"q.jsonl, row 2: field 'turns' must be a list of two"):
        load_questions(bad)
