"""A tiny procedurally generated "movie review" language with a known true reward.

This is the demo's stand-in for IMDb in the DPO paper's controlled-sentiment
experiment (Rafailov et al. 2023, section 6.1): prompts are review openings,
completions are review continuations, and the reward is a sentiment score. Here
the sentiment is not a learned classifier but an exact rule over the words, so
the demo can measure alignment without any model of its own:

    sentiment(text) = 1.0 if the text has more positive than negative sentiment words,
                      0.0 if it has more negative than positive ones,
                      0.5 if the counts are equal (including no sentiment words at all).

Openings never contain sentiment words, so the sentiment of ``opening + completion``
is the sentiment of the completion alone.

The language is a closed vocabulary of lowercase words (no punctuation), so a
word-level tokenizer covers it and every sample is readable. It is also regular:
`is_well_formed` checks a continuation against the same templates that generate
it, which lets the demo tell fluent text apart from reward-hacked word salad.

Everything is deterministic given a `random.Random`; a fixed hash of each opening
splits the openings into a train part and a held-out eval part.
"""

from __future__ import annotations

import hashlib
import random
import re
import zlib
from functools import lru_cache

# ---- lexicon ---------------------------------------------------------------
# Sentiment words: the only words the true reward looks at. Each positive word
# has a negative counterpart in the same slots, so the two polarities have the
# same grammar and the same length distribution (no length bias in pairs).
POSITIVE_ADJ = ["great", "wonderful", "moving", "brilliant", "delightful", "charming", "superb", "fantastic"]
NEGATIVE_ADJ = ["boring", "awful", "dull", "terrible", "clumsy", "tedious", "bland", "dreadful"]
POSITIVE_VERB = ["loved", "enjoyed", "adored", "admired"]
NEGATIVE_VERB = ["hated", "disliked", "loathed", "despised"]
POSITIVE_WORDS = frozenset(POSITIVE_ADJ + POSITIVE_VERB)
NEGATIVE_WORDS = frozenset(NEGATIVE_ADJ + NEGATIVE_VERB)

# Neutral filler: no sentiment, only variety.
SLOTS: dict[str, list[str]] = {
    "det": ["the", "this", "that"],
    "work": ["film", "movie", "show", "sequel", "documentary", "musical", "series", "remake", "cartoon", "thriller"],
    "aspect": [
        "plot",
        "acting",
        "story",
        "ending",
        "soundtrack",
        "script",
        "cast",
        "dialogue",
        "music",
        "pacing",
        "humor",
        "villain",
    ],
    "person": ["friend", "brother", "sister", "mother", "father", "neighbor", "teacher", "cousin", "roommate", "uncle"],
    "link": ["was", "seemed", "felt"],
    "time": ["yesterday", "tonight", "last night", "on sunday", "this weekend", "after dinner"],
    "intens": ["really", "so", "quite", "very", "truly", "pretty", "rather"],
    "nadj": ["long", "short", "loud", "quiet", "strange", "familiar", "simple", "unusual"],
    "number": ["two", "three", "four"],
    "crowd": ["full", "empty", "packed", "cold", "warm", "dark"],
}

# Who likes or dislikes it in a clause: a person is always "my <person>".
SLOTS["subject"] = ["i", "we"] + [f"my {p}" for p in SLOTS["person"]]

# Openings end in a linking verb, so every continuation starts with an adjective phrase.
OPENING_TEMPLATES = [
    "{det} {work} {link}",
    "i thought the {work} {link}",
    "we all agreed the {aspect} {link}",
    "my {person} said the {aspect} {link}",
    "{time} i watched the {work} and it {link}",
    "honestly the {aspect} of this {work} {link}",
    "i watched this {work} and the {aspect} {link}",
    "my {person} and i saw the {work} {time} and it {link}",
]

# A continuation is a first part (an adjective phrase completing the opening)
# followed by clauses joined with "and" / "but". {adj} and {verb} take the
# polarity of the part they render; a polar clause holds exactly one sentiment word.
FIRST_TEMPLATES = ["{adj}", "{intens} {adj}"]
POLAR_TEMPLATES = [
    "the {aspect} {link} {adj}",
    "the {aspect} {link} {intens} {adj}",
    "{subject} {verb} the {aspect}",
    "{subject} {verb} it",
    "{subject} {verb} every minute of it",
]
NEUTRAL_TEMPLATES = [
    "the {aspect} {link} {nadj}",
    "the {aspect} {link} {intens} {nadj}",
    "it ran about {number} hours",
    "{subject} saw it {time}",
    "the theater was {crowd}",
]
CONNECTORS = ["and", "but"]

MIN_WORDS, MAX_WORDS = 6, 14  # continuation length range, in words
HELD_OUT_MODULUS = 5  # one opening in five (by a fixed hash) is held out for evaluation

_SLOT = re.compile(r"\{(\w+)\}")
_ADJ = {"positive": POSITIVE_ADJ, "negative": NEGATIVE_ADJ, "neutral": SLOTS["nadj"]}
_VERB = {"positive": POSITIVE_VERB, "negative": NEGATIVE_VERB}


def _render(template: str, rng: random.Random, polarity: str = "neutral") -> str:
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name == "adj":
            return rng.choice(_ADJ[polarity])
        if name == "verb":
            return rng.choice(_VERB[polarity])
        return rng.choice(SLOTS[name])

    return _SLOT.sub(fill, template)


def opening_split(opening: str) -> str:
    """ "eval" for the fixed fifth of openings held out from training, else "train".

    A hash of the text (not the rng) decides, so the split is the same for every
    seed and every caller: SFT and preference training never see an eval opening.
    """
    return "eval" if zlib.crc32(opening.encode()) % HELD_OUT_MODULUS == 0 else "train"


def sample_opening(rng: random.Random, split: str = "train") -> str:
    """A review opening ("my friend said the plot was"); split: "train", "eval" or "all"."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', not {split!r}")
    while True:
        opening = _render(rng.choice(OPENING_TEMPLATES), rng)
        if split == "all" or opening_split(opening) == split:
            return opening


def sample_continuation(rng: random.Random, sentiment: str) -> str:
    """A continuation of MIN_WORDS..MAX_WORDS words with the given sentiment, with a leading space.

    sentiment: "positive" or "negative". The continuation has 1-3 sentiment words
    of that polarity, sometimes one contrasting word of the other polarity (joined
    with "but"; only when it is outnumbered, so the rule still gives the intended
    label), and 0-2 neutral clauses, in random order.
    """
    if sentiment not in ("positive", "negative"):
        raise ValueError(f"sentiment must be 'positive' or 'negative', not {sentiment!r}")
    other = "negative" if sentiment == "positive" else "positive"
    while True:
        n_main = rng.choice([1, 2, 2, 3])
        n_contrast = 1 if n_main >= 2 and rng.random() < 0.3 else 0
        n_neutral = rng.choice([0, 1, 1, 2])
        parts = [sentiment] * n_main + [other] * n_contrast + ["neutral"] * n_neutral
        rng.shuffle(parts)
        words = _render(rng.choice(FIRST_TEMPLATES), rng, parts[0]).split()
        last_polar = parts[0] if parts[0] != "neutral" else None
        for polarity in parts[1:]:
            turn = polarity != "neutral" and last_polar is not None and polarity != last_polar
            words.append("but" if turn else "and")
            templates = NEUTRAL_TEMPLATES if polarity == "neutral" else POLAR_TEMPLATES
            words += _render(rng.choice(templates), rng, polarity).split()
            if polarity != "neutral":
                last_polar = polarity
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            return " " + " ".join(words)


def sentiment(text: str) -> float:
    """The true reward: 1.0 / 0.0 / 0.5 for more positive / more negative / equally many sentiment words."""
    words = text.split()
    pos = sum(w in POSITIVE_WORDS for w in words)
    neg = sum(w in NEGATIVE_WORDS for w in words)
    return 1.0 if pos > neg else 0.0 if neg > pos else 0.5


def is_positive(text: str) -> bool:
    return sentiment(text) == 1.0


def _alternation(words: list[str]) -> str:
    # Longest first so that multi-word values ("last night") win over prefixes.
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


@lru_cache(maxsize=1)
def _continuation_pattern() -> re.Pattern:
    classes = {name: _alternation(values) for name, values in SLOTS.items()}
    classes["adj"] = _alternation(POSITIVE_ADJ + NEGATIVE_ADJ + SLOTS["nadj"])
    classes["verb"] = _alternation(POSITIVE_VERB + NEGATIVE_VERB)

    def compile_templates(templates: list[str]) -> str:
        return "(?:" + "|".join(_SLOT.sub(lambda m: classes[m.group(1)], t) for t in templates) + ")"

    first = compile_templates(FIRST_TEMPLATES)
    clause = compile_templates(POLAR_TEMPLATES + NEUTRAL_TEMPLATES)
    connector = _alternation(CONNECTORS)
    return re.compile(rf"{first}(?: {connector} {clause})*")


def is_well_formed(completion: str) -> bool:
    """Whether a completion is a sentence of the continuation grammar (any length, any sentiment).

    Stricter than "uses only known words": "great great great" or a clause cut off
    halfway fails, so a policy that hacks the reward with word salad is caught.
    """
    return _continuation_pattern().fullmatch(" ".join(completion.split())) is not None


def vocabulary() -> list[str]:
    """Every word the language uses, sorted; the word-level tokenizer is built from this."""
    words: set[str] = set(POSITIVE_WORDS | NEGATIVE_WORDS) | set(CONNECTORS)
    for values in SLOTS.values():
        for value in values:
            words.update(value.split())
    for template in OPENING_TEMPLATES + FIRST_TEMPLATES + POLAR_TEMPLATES + NEUTRAL_TEMPLATES:
        words.update(w for w in _SLOT.sub(" ", template).split())
    return sorted(words)


def fingerprint() -> str:
    """A short hash of the whole language definition, so cached artefacts rebuild when it changes."""
    parts = [
        POSITIVE_ADJ,
        NEGATIVE_ADJ,
        POSITIVE_VERB,
        NEGATIVE_VERB,
        sorted(SLOTS.items()),
        OPENING_TEMPLATES,
        FIRST_TEMPLATES,
        POLAR_TEMPLATES,
        NEUTRAL_TEMPLATES,
        CONNECTORS,
        MIN_WORDS,
        MAX_WORDS,
        HELD_OUT_MODULUS,
    ]
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def sft_corpus(n: int, seed: int = 0, positive_share: float = 0.4) -> list[tuple[str, str]]:
    """n (opening, continuation) pairs from train openings; positive with probability positive_share.

    The share is well below the DPO target (most samples positive), so the SFT
    model starts out mostly negative and alignment has room to show.
    """
    rng = random.Random(seed)
    corpus = []
    for _ in range(n):
        label = "positive" if rng.random() < positive_share else "negative"
        corpus.append((sample_opening(rng, "train"), sample_continuation(rng, label)))
    return corpus


def preference_pairs(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """n {"prompt", "chosen", "rejected"} rows: one opening, a positive and a negative continuation.

    Chosen and rejected are drawn independently from the same grammar, so their
    lengths have the same distribution and length cannot stand in for preference.
    """
    rng = random.Random(seed)
    return [
        {
            "prompt": sample_opening(rng, split),
            "chosen": sample_continuation(rng, "positive"),
            "rejected": sample_continuation(rng, "negative"),
        }
        for _ in range(n)
    ]


def _expand(template: str) -> list[str]:
    """Every string a template can render to (slot by slot, left to right)."""
    m = _SLOT.search(template)
    if m is None:
        return [template]
    return [t for v in SLOTS[m.group(1)] for t in _expand(template[: m.start()] + v + template[m.end() :])]


def all_openings(split: str = "all") -> list[str]:
    """Every opening the grammar can produce in a split, sorted (for held-out prompt sets)."""
    openings = {o for template in OPENING_TEMPLATES for o in _expand(template)}
    return sorted(o for o in openings if split == "all" or opening_split(o) == split)


def eval_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct held-out openings (never seen in SFT or preference training), for evaluation."""
    pool = all_openings("eval")
    return random.Random(seed).sample(pool, min(n, len(pool)))
