"""Two-turn conversations judged turn by turn, as MT-Bench does (Zheng et al. 2023, arXiv:2306.05685, section 3).

The model answers turn 1, then turn 2 with its own turn-1 answer in the conversation (chat template), greedily.
Single mode: a judge behind an OpenAI-compatible endpoint rates each answer 1-10 after a short rationale,
ending with "Rating: [[N]]"; the turn-2 rating sees the whole conversation. Pairwise mode: the judge compares
the policy's and the baseline's answers per turn, asked in both orders (the position swap of MT-Bench), with the
verdict "[[A]]", "[[B]]" or "[[C]]" (tie); any judge with `compare(prompts, a, b)` works here, a local one too.
Replies are read by the one grammar of online/judge_grammar.py; a reply it finds no rating or verdict in is a
parse failure: counted in `parse_failures` and left out of the mean, never silently.

Questions: JSONL rows {"question_id", "category", "turns": [turn 1, turn 2]} (MT-Bench's format); a set of 10
ships in data/multiturn_questions.jsonl.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from dpokit.data.records import DataError
from dpokit.inputs import iter_jsonl
from dpokit.online.judge_grammar import parse_rating, parse_verdict
from dpokit.online.judges import ChatClient, both_orders
from dpokit.online.suites.answers import answer
from dpokit.online.suites.stats import mean_sem

DEFAULT_QUESTIONS = Path(__file__).with_name("data") / "multiturn_questions.jsonl"


class QuestionsError(DataError):
    """A questions-file row that cannot be used; the message names the file, row and field."""


def load_questions(path: str | Path | None = None, max_questions: int | None = None) -> list[dict]:
    path = Path(path) if path else DEFAULT_QUESTIONS
    rows = []
    for number, row in iter_jsonl(path, "suite", "--multiturn-questions"):  # the gateway: a file, within its limit
        if max_questions is not None and len(rows) >= max_questions:
            break
        turns = row.get("turns")
        if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) and t.strip() for t in turns)):
            raise QuestionsError(f"{path}, row {number}: field 'turns' must be a list of two non-empty strings")
        rows.append(
            {"question_id": row.get("question_id", number), "category": row.get("category", ""), "turns": turns}
        )
    return rows if max_questions is None else rows[:max_questions]


def converse(
    model, tokenizer, questions: Sequence[dict], *, max_new_tokens: int = 256, seed: int = 0, batch_size: int = 16
) -> list[list[str]]:
    """[turn-1 answer, turn-2 answer] per question; turn 2 is asked with the model's own turn-1 answer before it."""
    first = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    answers1 = [
        s.completion.strip()
        for s in answer(model, tokenizer, first, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    ]
    second = [
        [*c, {"role": "assistant", "content": a}, {"role": "user", "content": q["turns"][1]}]
        for c, a, q in zip(first, answers1, questions)
    ]
    answers2 = [
        s.completion.strip()
        for s in answer(model, tokenizer, second, max_new_tokens=max_new_tokens, seed=seed + 1, batch_size=batch_size)
    ]
    return [[a1, a2] for a1, a2 in zip(answers1, answers2)]


SYSTEM = "You are a helpful and impartial judge of AI assistants' answers."
SINGLE_TEMPLATE = (
    "Judge the quality of the assistant's answer to the {which} user question in the conversation below. Consider "
    "helpfulness, relevance, accuracy, depth and level of detail{context}. First explain your judgment briefly and "
    'objectively. Then rate the answer on a scale of 1 to 10, in exactly this format: "Rating: [[5]]".\n\n'
    "{conversation}"
)
PAIRWISE_TEMPLATE = (
    "Two AI assistants answered the user below. Judge which assistant answered the user's last question better, by "
    "helpfulness, relevance, accuracy, depth and level of detail. The order in which the answers are shown, "
    "their length and the assistants' names must not influence you. Explain your judgment briefly, then give your "
    'verdict in exactly this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, '
    '"[[C]]" for a tie.\n\n{prompt}\n\n[Assistant A]\n{a}\n\n[Assistant B]\n{b}'
)


def _transcript(question: dict, answers: Sequence[str], turn: int) -> str:
    lines = []
    for k in range(turn):
        lines += [f"### User (turn {k + 1})\n{question['turns'][k]}", f"### Assistant (turn {k + 1})\n{answers[k]}"]
    return "\n\n".join(lines)


def _which(turn: int) -> tuple[str, str]:
    return ("first", "") if turn == 1 else ("second", ", taking the first turn into account")


MT_BENCH_MAX_TOKENS = 1024  # FastChat's MT-Bench judge allows 2048; a rationale and a rating fit in far less


class MTBenchJudge:
    """The judge of single mode: each turn's answer rated 1-10 with a rationale (`rate`); also a pairwise judge
    with MT-Bench's verdict format (`compare`, both orders). `unparsed` counts unreadable replies, as the other judges do."""

    def __init__(self, base_url: str, model: str, **client_options):
        # The judge writes its rationale before the rating (MT-Bench's format): with the pointwise judges' 64
        # tokens the reply is cut before "Rating: [[N]]" and every turn would count as unparsed.
        client_options.setdefault("max_tokens", MT_BENCH_MAX_TOKENS)
        self.client = ChatClient(base_url, model, **client_options)
        self.name = f"MT-Bench-style judge {model} at {self.client.url}"
        self.unparsed = 0

    def _ask(self, content: str) -> str:
        return self.client.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}])

    def rate(self, question: dict, answers: Sequence[str], turn: int) -> tuple[float, str]:
        which, context = _which(turn)
        reply = self._ask(
            SINGLE_TEMPLATE.format(which=which, context=context, conversation=_transcript(question, answers, turn))
        )
        rating = parse_rating(reply)
        self.unparsed += math.isnan(rating)
        return rating, reply

    def compare(self, prompts, completions_a, completions_b) -> list[float]:
        """Per item: 1 A better, 0 B better, 0.5 tie, averaged over both orders; NaN when neither order parsed."""
        out = []
        for prompt, a, b in zip(prompts, completions_a, completions_b):
            first = parse_verdict(self._ask(PAIRWISE_TEMPLATE.format(prompt=prompt, a=a, b=b)))
            swapped = parse_verdict(self._ask(PAIRWISE_TEMPLATE.format(prompt=prompt, a=b, b=a)))
            self.unparsed += math.isnan(first) + math.isnan(swapped)
            out.append(both_orders(first, swapped))
        return out


def score_single(judge: MTBenchJudge, questions: Sequence[dict], conversations: Sequence[Sequence[str]]) -> dict:
    """Mean rating per turn and overall (with SEMs), parse failures, and every rating with its rationale."""
    before = judge.unparsed
    records = []
    for question, answers in zip(questions, conversations):
        rated = [judge.rate(question, answers, turn) for turn in (1, 2)]
        records.append(
            {
                "question_id": question["question_id"],
                "answers": list(answers),
                "ratings": [r for r, _ in rated],
                "rationales": [why for _, why in rated],
            }
        )
    out: dict = {"num_questions": len(records), "parse_failures": judge.unparsed - before}
    for turn in (1, 2):
        out[f"turn{turn}_score"], out[f"turn{turn}_score_sem"] = mean_sem([r["ratings"][turn - 1] for r in records])
    out["score"], out["score_sem"] = mean_sem([v for r in records for v in r["ratings"]])
    out["per_question"] = records
    return out


def _pair_texts(question: dict, answers: Sequence[str], turn: int) -> str:
    if turn == 1:
        return answers[0]
    return f"[Answer to turn 1]\n{answers[0]}\n\n[Answer to turn 2]\n{answers[1]}"


def _pair_prompt(question: dict, turn: int) -> str:
    if turn == 1:
        return f"[User question]\n{question['turns'][0]}"
    return (
        f"[User, turn 1]\n{question['turns'][0]}\n\n[User, turn 2]\n{question['turns'][1]}\n\n"
        "(Each assistant's turn-1 answer is shown with its turn-2 answer; judge the turn-2 answers.)"
    )


def score_pairwise(
    judge, questions: Sequence[dict], policy: Sequence[Sequence[str]], baseline: Sequence[Sequence[str]]
) -> dict:
    """Win rate of the policy over the baseline per turn and overall (ties 1/2, both orders), with SEMs.

    judge: an MTBenchJudge, or any pairwise judge with compare(prompts, a, b) -> [1 A, 0 B, 0.5 tie] (the local
    judge, online.judges.PairwiseJudge). NaN verdicts (parse failures) are counted and left out of the means.
    """
    before = getattr(judge, "unparsed", 0)  # the local judge reads probabilities: it has no unreadable replies
    per_turn = {}
    for turn in (1, 2):
        prompts = [_pair_prompt(q, turn) for q in questions]
        a = [_pair_texts(q, answers, turn) for q, answers in zip(questions, policy)]
        b = [_pair_texts(q, answers, turn) for q, answers in zip(questions, baseline)]
        per_turn[turn] = judge.compare(prompts, a, b)
    out: dict = {
        "num_questions": len(questions),
        "parse_failures": getattr(judge, "unparsed", 0) - before,
        "unjudged": sum(math.isnan(v) for turn in (1, 2) for v in per_turn[turn]),
    }
    for turn in (1, 2):
        out[f"turn{turn}_win_rate"], out[f"turn{turn}_win_rate_sem"] = mean_sem(per_turn[turn])
    out["win_rate"], out["win_rate_sem"] = mean_sem(per_turn[1] + per_turn[2])
    out["per_question"] = [
        {"question_id": q["question_id"], "wins": [per_turn[1][i], per_turn[2][i]]} for i, q in enumerate(questions)
    ]
    return out
