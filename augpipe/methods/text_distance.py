"""Edit distance between a source sentence and a paraphrase candidate (back-speech filter, METHODS §1.1).

The back-speech filter keeps an ASR transcript as a paraphrase only when it stays close to the source:
"drop if edit distance > 20 % of original length". The unit is unspecified in the sources; we use
character Levenshtein distance divided by the character length of the original.

Comparisons run on normalised text by default. ASR systems change case and punctuation as a matter of
course (Whisper writes "Hello, world." for "hello world"; others emit no punctuation at all), and such a
change is neither a paraphrase nor a meaning drift: counted raw, it would make verbatim transcripts look
like new sentences (defeating the copy check) and spend the 20 % edit budget on commas. Normalising
removes that noise so the distance measures changed words.

Pure functions over strings; no model, no I/O.
"""

from __future__ import annotations

import math
import re
import unicodedata

from rapidfuzz.distance import Levenshtein

_APOSTROPHES = frozenset("'\u2019\u02bc\u2018`")
# Unicode files these under punctuation (Po), but they stand for words ("percent", "and", "at", "number"):
# dropping them would make "50% off" a copy of "50 off".
_MEANINGFUL = frozenset("%&@#")
_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Casefold, strip punctuation and collapse whitespace, for comparison only (never for output).

    - Unicode NFKC first, so full-width letters and ligatures compare equal to their plain forms.
    - Apostrophes are deleted ("don't" -> "dont"): ASR writes contractions with or without them.
    - Every other punctuation character (Unicode category P*) becomes a space, so "well-known" and
      "well known" agree. Symbols ("$", "+") and the word-like "% & @ #" are kept: they carry meaning.
    - Runs of whitespace collapse to one space; leading and trailing space is removed.

    >>> normalize_text("  It's a WELL-known fact...  ")
    'its a well known fact'
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        punctuation = unicodedata.category(ch).startswith("P") and ch not in _MEANINGFUL
        out.append(" " if punctuation else ch)
    return _WHITESPACE.sub(" ", "".join(out)).strip()


def prepare(original: str, candidate: str, normalize: bool = True) -> tuple[str, str]:
    """The two forms that are compared: normalised when ``normalize``, else unchanged."""
    if normalize:
        return normalize_text(original), normalize_text(candidate)
    return original, candidate


def edit_distance(a: str, b: str) -> int:
    """Character Levenshtein distance (insertions, deletions and substitutions all cost 1)."""
    return int(Levenshtein.distance(a, b))


def edit_ratio(original: str, candidate: str) -> float:
    """Character Levenshtein distance divided by ``len(original)``, on the strings as given.

    Not symmetric and not bounded by 1: the denominator is the source's length, as in the paper's
    "20 % of original length". An empty original gives 0.0 against an empty candidate and ``inf``
    against anything else (no finite budget of an empty sentence can be spent).
    """
    if not original:
        return 0.0 if not candidate else math.inf
    return edit_distance(original, candidate) / len(original)


def is_copy(original: str, candidate: str, normalize: bool = True) -> bool:
    """Whether ``candidate`` repeats ``original`` (normalised when ``normalize``): no augmentation."""
    a, b = prepare(original, candidate, normalize)
    return a == b


def paraphrase_edit_ratio(original: str, candidate: str, normalize: bool = True) -> float:
    """``edit_ratio`` on the compared forms (normalised when ``normalize``)."""
    return edit_ratio(*prepare(original, candidate, normalize))
