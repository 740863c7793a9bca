"""Checkers for verifiable instructions, by the instruction ids of IFEval (Zhou et al. 2023, arXiv:2311.07911).

Each checker is `check(response, **kwargs) -> bool`, with the paper's argument names (num_words, relation,
keywords, ...). A relation is "less than" (count < N) or "at least" (count >= N), as in the paper. These are
dpokit's own implementations of the paper's definitions (table 1 of the paper); where the paper leaves a
detail open, the choice is written in the checker's docstring. `CHECKERS` maps every id to its checker.
"""

from __future__ import annotations

import json
import re
from typing import Callable

RELATIONS = ("less than", "at least")


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w+\b", text)


def _sentences(text: str) -> list[str]:
    """Sentences end with . ! or ? followed by white space or the end of the text (runs like '?!' are one end)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]


# --- length_constraints ------------------------------------------------------------------------


def number_words(response: str, num_words: int, relation: str) -> bool:
    """Words are runs of letters, digits or underscores (so "don't" is two)."""
    return _compare(len(_words(response)), relation, num_words)


def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return _compare(len(_sentences(response)), relation, num_sentences)


def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Exactly N paragraphs separated by the markdown divider ***; an empty paragraph fails."""
    parts = re.split(r"\s?\*\*\*\s?", response.strip())
    return len(parts) == num_paragraphs and all(p.strip() for p in parts)


def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly N paragraphs separated by blank lines, and paragraph nth (from 1) starts with first_word (case and
    surrounding punctuation ignored)."""
    parts = [p for p in re.split(r"\n\s*\n", response.strip()) if p.strip()]
    if len(parts) != num_paragraphs or not 1 <= nth_paragraph <= len(parts):
        return False
    words = parts[nth_paragraph - 1].split()
    return bool(words) and words[0].strip("\"'.,;:!?()[]*").lower() == first_word.lower()


# --- keywords ---------------------------------------------------------------------------------


def _count(keyword: str, response: str) -> int:
    return len(re.findall(r"\b" + re.escape(keyword) + r"\b", response, flags=re.IGNORECASE))


def keyword_existence(response: str, keywords: list[str]) -> bool:
    """Every keyword appears as a whole word (case ignored)."""
    return all(_count(k, response) > 0 for k in keywords)


def forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    """No forbidden word appears as a whole word (case ignored): "cats" does not contain the word "cat"."""
    return all(_count(w, response) == 0 for w in forbidden_words)


def keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(_count(keyword, response), relation, frequency)


def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


# --- punctuation, case --------------------------------------------------------------------------


def no_comma(response: str) -> bool:
    return "," not in response


def english_lowercase(response: str) -> bool:
    """No upper-case letter at all (a text without letters passes)."""
    return response == response.lower()


def english_capital(response: str) -> bool:
    """No lower-case letter at all."""
    return response == response.upper()


def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    """Words written all in capitals (at least one letter, e.g. "NOW", "AI2"), compared with capital_frequency."""
    capitals = [w for w in _words(response) if re.search(r"[A-Za-z]", w) and w == w.upper()]
    return _compare(len(capitals), capital_relation, capital_frequency)


# --- detectable_format --------------------------------------------------------------------------


def json_format(response: str) -> bool:
    """The whole response parses as JSON, optionally inside one ``` or ```json fence."""
    text = response.strip()
    fenced = re.fullmatch(r"```(?:json|JSON)?\s*\n?(.*?)\n?```", text, flags=re.S)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly N markdown bullets: lines starting with '* ' or '- ' (a '**bold**' line is not a bullet)."""
    bullets = re.findall(r"^\s*(?:\*(?!\*)|-)\s+\S", response, flags=re.M)
    return len(bullets) == num_bullets


def title(response: str) -> bool:
    """A title in double angular brackets, such as <<poem of joy>>, with some text inside."""
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", response))


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least N sections, each started by its marker and number: 'SECTION 1', 'SECTION 2', ..."""
    found = re.findall(r"(?:^|\s)" + re.escape(section_spliter) + r"\s?\d+", response)
    return len(found) >= num_sections


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """At least N parts highlighted in markdown, *like this* or **like this**, with text inside."""
    single = [h for h in re.findall(r"(?<!\*)\*([^\n*]+)\*(?!\*)", response) if h.strip()]
    double = [h for h in re.findall(r"\*\*([^\n*]+)\*\*", response) if h.strip()]
    return len(single) + len(double) >= num_highlights


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(response: str) -> bool:
    """One of the options "My answer is yes." / "no." / "maybe." appears in the response."""
    return any(option in response for option in CONSTRAINED_OPTIONS)


# --- startend, detectable_content, combination --------------------------------------------------


def end_checker(response: str, end_phrase: str) -> bool:
    """The response ends with end_phrase exactly (case and surrounding white space ignored): nothing after it."""
    return response.strip().lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def postscript(response: str, postscript_marker: str) -> bool:
    """A line that starts with the marker (e.g. "P.S." or "P.P.S"), case ignored, followed by some text."""
    pattern = r"^\s*" + re.escape(postscript_marker) + r".*\w"
    return re.search(pattern, response, flags=re.M | re.IGNORECASE) is not None


def number_placeholders(response: str, num_placeholders: int) -> bool:
    """At least N placeholders in square brackets, such as [address]."""
    return len(re.findall(r"\[[^\[\]\n]+\]", response)) >= num_placeholders


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    """The response starts with the request repeated word for word (case and surrounding white space ignored)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def two_responses(response: str) -> bool:
    """Exactly two different, non-empty responses separated by six asterisks ******."""
    parts = [p.strip() for p in response.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


CHECKERS: dict[str, Callable[..., bool]] = {
    "length_constraints:number_words": number_words,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "keywords:existence": keyword_existence,
    "keywords:forbidden_words": forbidden_words,
    "keywords:frequency": keyword_frequency,
    "keywords:letter_frequency": letter_frequency,
    "punctuation:no_comma": no_comma,
    "change_case:english_lowercase": english_lowercase,
    "change_case:english_capital": english_capital,
    "change_case:capital_word_frequency": capital_word_frequency,
    "detectable_format:json_format": json_format,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:title": title,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:constrained_response": constrained_response,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "detectable_content:postscript": postscript,
    "detectable_content:number_placeholders": number_placeholders,
    "combination:repeat_prompt": repeat_prompt,
    "combination:two_responses": two_responses,
}
