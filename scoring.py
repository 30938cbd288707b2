"""Scoring free-form answers (Sec. 5.1; docs/design.md §10): the ONE multiple-choice parser every benchmark
uses, the EvalAI answer normalisation and the VQA accuracy of OK-VQA."""

from __future__ import annotations

import re
import string

_STRIP = r"[\s()\[\]{}.,:;!?*\"'`]*"
_BARE = re.compile(_STRIP + r"([A-Za-z])" + _STRIP)  # "B", "(B)", "b)", "A.", "**C**"
_LEADING = re.compile(r"\s*[*\"'`]*\(?([A-Za-z])(?:\)|:|\.(?![A-Za-z])|[ \t]*\n)")  # "B. red", "(A) 3"
_PARENTHESISED = re.compile(r"(?<![A-Za-z0-9])\(([A-Za-z])\)")  # "The answer is (C).", not "cat(s)"
_NAMED = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is))?[\s:*]*([A-Za-z])(?=[ \t]*(?:[.,;:!?)\n]|$))"
)


def parse_choice(text: str) -> str | None:
    """The option letter ("A".."Z") a free-form answer picks, or None. The first rule that matches wins:
    1. the whole answer is one letter, up to brackets, punctuation and markdown: "B", "(B)", "b)", "A.";
    2. it starts with a letter closed by ")", ":", "." (not "U.S.") or a line break: "B. red", "(A) 3";
    3. a letter in parentheses anywhere, not glued to a word: "The answer is (C)." (not "cat(s)");
    4. "answer" / "option" / "choice" (+ "is", ":") and a letter that stands alone, i.e. followed by
       punctuation, a line break or the end: "Answer: B", "option c", "The answer is A".
    A letter running into a word is never one: "A cat", "I think it is blue", "Answer: B because" -> None.
    Each answer is parsed on its own: None scores wrong (the released parser reused the previous
    sample's prediction instead, Sec. 5.1)."""
    match = (
        _BARE.fullmatch(text) or _LEADING.match(text) or _PARENTHESISED.search(text) or _NAMED.search(text)
    )
    if match is None:
        return None
    return match.group(1).upper()


NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}
ARTICLES = frozenset({"a", "an", "the"})
# A subset of EvalAI's contractions table (apostrophe-less form -> standard form), leaving out the keys
# that are also ordinary words ("hed", "shed", "wed", "ill", "its", "lets", "well", "were").
SHORT_FORMS = {
    w.replace("'", ""): w
    for w in [
        "ain't",
        "aren't",
        "can't",
        "couldn't",
        "could've",
        "didn't",
        "doesn't",
        "don't",
        "hadn't",
        "hasn't",
        "haven't",
        "he's",
        "how's",
        "i'm",
        "i've",
        "isn't",
        "it'll",
        "ma'am",
        "mightn't",
        "might've",
        "mustn't",
        "must've",
        "needn't",
        "o'clock",
        "shan't",
        "shouldn't",
        "should've",
        "that's",
        "there's",
        "they'd",
        "they'll",
        "they're",
        "they've",
        "wasn't",
        "weren't",
        "we've",
        "what's",
        "where's",
        "who's",
        "won't",
        "wouldn't",
        "would've",
        "y'all",
        "you'd",
        "you'll",
        "you're",
        "you've",
    ]
}
_EVALAI_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # EvalAI removes these; ".", "'", ":" are handled apart
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not before a digit: "dog." -> "dog", "2.5" stays


def normalize_answer(text: str) -> str:
    """The EvalAI VQA answer processor: lower-case, newlines/tabs -> spaces, strip; each punctuation mark is
    deleted where it touches a space (or anywhere once the text has a digit-comma-digit, "1,000" -> "1000")
    and becomes a space elsewhere ("t-shirt" -> "t shirt"); periods go except before a digit ("2.5"); then
    number words -> digits ("two" -> "2", "none" -> "0"), articles dropped, contractions ("dont" ->
    "don't")."""
    original = text.lower().replace("\n", " ").replace("\t", " ").strip()
    glued = _DIGIT_COMMA.search(original) is not None
    text = original
    for mark in _EVALAI_PUNCTUATION:
        if glued or f"{mark} " in original or f" {mark}" in original:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text)
    numbers = {**NUMBER_WORDS, "none": "0"}
    words = [numbers.get(w, w) for w in text.split()]
    return " ".join(SHORT_FORMS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy of one prediction against its human answers (10 in OK-VQA), all normalised: the
    mean over answers i of min(1, #(other answers equal to the prediction) / 3)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    prediction = normalize_answer(prediction)
    same = [normalize_answer(a) == prediction for a in answers]
    return sum(min(1.0, (sum(same) - s) / 3) for s in same) / len(same)


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def plain_text(text: str) -> str:
    """lmms-eval's exact-match view of an open answer: lower-case, no punctuation, number words -> digits."""
    return " ".join(NUMBER_WORDS.get(w, w) for w in text.lower().translate(_PUNCTUATION).split())
