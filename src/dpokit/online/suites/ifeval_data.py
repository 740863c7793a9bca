"""The shipped IFEval-style prompt set (data/ifeval_prompts.jsonl), generated here so it can be rebuilt and checked.

    python -m dpokit.online.suites.ifeval_data   # rewrites data/ifeval_prompts.jsonl

48 prompts: a task on one of 12 topics, plus one to three instructions, each written out in the prompt and
recorded with the paper's id and arguments. Seeded, so the file is the same on every run.
"""

from __future__ import annotations

import json
import random
import sys

from dpokit.online.suites.ifeval import DEFAULT_PROMPTS

TOPICS = [
    "the water cycle",
    "a walk in the park",
    "how bicycles work",
    "the history of tea",
    "learning a new language",
    "a rainy afternoon",
    "why the sky is blue",
    "the life of honeybees",
    "a small coffee shop",
    "planting tomatoes",
    "the moon landing",
    "saving money",
]
TASKS = [
    "Write a short essay about {t}.",
    "Describe {t} to a child.",
    "Write a blog post about {t}.",
    "Explain {t} to a friend.",
]
KEYWORDS = ["river", "morning", "simple", "friend", "green", "light"]


def _instruction(kind: str, rng: random.Random, topic: str) -> tuple[str, dict, str]:
    """(instruction id, kwargs, the sentence that asks for it)."""
    n = rng.randint(2, 4)
    if kind == "words":
        relation, num = rng.choice([("less than", rng.choice([60, 100])), ("at least", rng.choice([40, 80]))])
        return (
            "length_constraints:number_words",
            {"num_words": num, "relation": relation},
            f"Answer with {relation} {num} words.",
        )
    if kind == "sentences":
        relation, num = rng.choice([("less than", 6), ("at least", 3)])
        return (
            "length_constraints:number_sentences",
            {"num_sentences": num, "relation": relation},
            f"Use {relation} {num} sentences.",
        )
    if kind == "paragraphs":
        return (
            "length_constraints:number_paragraphs",
            {"num_paragraphs": n},
            f"There should be {n} paragraphs, separated from each other by the markdown divider ***.",
        )
    if kind == "nth_word":
        word = rng.choice(["first", "then", "finally"])
        return (
            "length_constraints:nth_paragraph_first_word",
            {"num_paragraphs": n, "nth_paragraph": 2, "first_word": word},
            f"Write {n} paragraphs separated by blank lines; the second paragraph must start with the word '{word}'.",
        )
    if kind == "keywords":
        words = rng.sample(KEYWORDS, 2)
        return "keywords:existence", {"keywords": words}, f"Include the keywords {words[0]} and {words[1]}."
    if kind == "forbidden":
        words = rng.sample(["very", "really", "thing", "nice"], 2)
        return "keywords:forbidden_words", {"forbidden_words": words}, f"Do not use the words {words[0]} or {words[1]}."
    if kind == "frequency":
        word = rng.choice(KEYWORDS)
        return (
            "keywords:frequency",
            {"keyword": word, "frequency": n, "relation": "at least"},
            f"The word {word} should appear at least {n} times.",
        )
    if kind == "letter":
        letter = rng.choice("aeiou")
        return (
            "keywords:letter_frequency",
            {"letter": letter, "let_frequency": 10, "let_relation": "at least"},
            f"The letter {letter} should appear at least 10 times.",
        )
    if kind == "comma":
        return "punctuation:no_comma", {}, "Do not use any commas in your response."
    if kind == "lower":
        return (
            "change_case:english_lowercase",
            {},
            "Your entire response should be in English, and in all lowercase letters.",
        )
    if kind == "upper":
        return (
            "change_case:english_capital",
            {},
            "Your entire response should be in English, and in all capital letters.",
        )
    if kind == "capital_words":
        return (
            "change_case:capital_word_frequency",
            {"capital_frequency": n, "capital_relation": "at least"},
            f"Use words in all capital letters at least {n} times.",
        )
    if kind == "json":
        return "detectable_format:json_format", {}, "Wrap your entire output in JSON format."
    if kind == "bullets":
        return (
            "detectable_format:number_bullet_lists",
            {"num_bullets": n},
            f"Your answer must contain exactly {n} bullet points, in markdown such as:\n* This is a point.",
        )
    if kind == "title":
        return (
            "detectable_format:title",
            {},
            "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        )
    if kind == "sections":
        return (
            "detectable_format:multiple_sections",
            {"section_spliter": "SECTION", "num_sections": n},
            f"Your response must have {n} sections. Mark the beginning of each section with SECTION X.",
        )
    if kind == "highlights":
        return (
            "detectable_format:number_highlighted_sections",
            {"num_highlights": n},
            f"Highlight at least {n} sections of your answer with markdown, i.e. *highlighted section*.",
        )
    if kind == "constrained":
        return (
            "detectable_format:constrained_response",
            {},
            "Answer with one of the following options: My answer is yes., My answer is no., My answer is maybe.",
        )
    if kind == "end":
        phrase = rng.choice(["Is there anything else I can help with?", "Any other questions?"])
        return "startend:end_checker", {"end_phrase": phrase}, f"Finish your response with this exact phrase: {phrase}"
    if kind == "quote":
        return "startend:quotation", {}, "Wrap your entire response with double quotation marks."
    if kind == "postscript":
        marker = rng.choice(["P.S.", "P.P.S"])
        return (
            "detectable_content:postscript",
            {"postscript_marker": marker},
            f"At the end of your response, add a postscript starting with {marker}",
        )
    if kind == "placeholders":
        return (
            "detectable_content:number_placeholders",
            {"num_placeholders": n},
            f"The response must contain at least {n} placeholders in square brackets, such as [address].",
        )
    if kind == "two":
        return (
            "combination:two_responses",
            {},
            "Give two different responses, separated by six asterisk symbols: ******.",
        )
    raise ValueError(kind)


KINDS = [
    "words",
    "sentences",
    "paragraphs",
    "nth_word",
    "keywords",
    "forbidden",
    "frequency",
    "letter",
    "comma",
    "lower",
    "upper",
    "capital_words",
    "json",
    "bullets",
    "title",
    "sections",
    "highlights",
    "constrained",
    "end",
    "quote",
    "postscript",
    "placeholders",
    "two",
    "repeat",
]
# Kinds that contradict each other (or the repeated prompt) are not combined in one prompt.
CLASHES = [
    {"lower", "upper", "capital_words"},
    {"json", "quote", "two", "repeat", "paragraphs", "nth_word", "sections", "bullets", "constrained"},
    {"upper", "repeat"},
    {"end", "postscript", "quote"},
]


def build_prompts(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        task = rng.choice(TASKS).format(t=topic)
        first = KINDS[i % len(KINDS)]  # every kind at least twice over 48 prompts
        kinds = [first]
        for _ in range(rng.randint(0, 2)):
            pick = rng.choice(KINDS)
            if pick not in kinds and not any(pick in c and any(k in c for k in kinds) for c in CLASHES):
                kinds.append(pick)
        ids, kwargs, asks = [], [], []
        for kind in kinds:
            if kind == "repeat":
                continue
            instruction, args, sentence = _instruction(kind, rng, topic)
            ids.append(instruction)
            kwargs.append(args)
            asks.append(sentence)
        request = " ".join([task, *asks])
        if "repeat" in kinds:
            prompt = (
                "First repeat the request below word for word without change, then give your answer (do not say "
                f"anything before repeating the request).\n{request}"
            )
            ids.insert(0, "combination:repeat_prompt")
            kwargs.insert(0, {"prompt_to_repeat": request})
        else:
            prompt = request
        rows.append({"key": 1000 + i, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs})
    return rows


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    DEFAULT_PROMPTS.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_PROMPTS.write_text(to_jsonl(build_prompts()), encoding="utf-8")
    print(f"wrote {DEFAULT_PROMPTS}", file=sys.stderr)
