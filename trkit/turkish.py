"""Turkish text utilities: casing, normalisation, mojibake repair, words, vowel harmony, suffixes.

* Casing. Turkish has two i's: dotted ``i``/``İ`` and dotless ``ı``/``I``. Python's ``str.lower``
  maps ``I`` to ``i`` and ``İ`` to ``i`` + U+0307 (two characters); ``lower``/``upper``/``casefold``
  here map İ↔i and I↔ı first, so lengths and offsets are kept.
* Normalisation: Unicode NFC (what Qwen's tokenizer applies), after mojibake repair.
* Mojibake: UTF-8 text decoded as cp1252/latin-1 shows pairs such as ``Ã¼`` (ü), ``Ã§`` (ç),
  ``Ä±`` (ı), ``ÅŸ`` (ş), ``ÄŸ`` (ğ). ``looks_mojibake`` is a cheap regex for those pairs;
  ``fix_mojibake`` calls ftfy (Speer 2019, "ftfy") only on lines where it fires, so clean text is
  never touched and the cost stays negligible.
* Words: runs of letters and digits; an apostrophe followed by letters stays in the word
  (``Türkiye'nin`` is one word), which is how Turkish writes suffixes on proper nouns. Tokens per
  word ("fertility", Rust et al. 2021, "How Good is Your Tokenizer?") is counted on these words.
* Vowel harmony (major, front/back): a native Turkish word's vowels are all back (a ı o u) or all
  front (e i ö ü). ``vowel_harmony`` is None for words with fewer than two vowels; the rate over a
  text is a language signal (loanwords and English fail it).
* ``turkish_score``: 0.4 * min(1, stopword share / 0.12) + 0.4 * min(1, Turkish-letter share / 0.04)
  + 0.2 * clip((vowel-harmony rate - 0.5) / 0.3, 0, 1) over the text's words and letters, times
  (1 - min(1, English-stopword share / 0.1)). Turkish running text scores near 1, English 0; short
  Turkish sentences without stopwords or Turkish letters still get the harmony share.
* Suffixes: ``segment`` splits a word into stem + suffix chain with a curated inventory of suffix
  allomorphs (``trkit/data/turkish_suffixes.tsv``, written for this project) and a slot order
  (derivation < negation < tense < plural < possessive < case < -ki < copula < person). Among the
  parses whose chain is valid, the stem is the shortest one that an optional lexicon (word ->
  count, e.g. the corpus's words) knows at least half as often as the whole word (so frequent
  words that merely end like a suffix stay whole; stems of two letters only before a suffix of two
  letters or more, as in ev|ler); without a lexicon the shortest plausible stem (three letters or
  more, no final consonant cluster that Turkish roots avoid) whose chain starts with a suffix of two
  letters or more. It is a heuristic (Turkish is ambiguous: ``kalem``
  is a pen or "my castle"), used only to *discourage* merges, never to forbid them.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Mapping

TURKISH_LETTERS = "çğıöşüÇĞİÖŞÜ"
BACK_VOWELS = frozenset("aıouâû")
FRONT_VOWELS = frozenset("eiöüî")
VOWELS = BACK_VOWELS | FRONT_VOWELS
STOPWORDS = frozenset(
    "ve bir bu da de için ile çok daha gibi ne o ben sen biz siz onlar şu her ama ancak veya ya en "
    "olarak olan ki mi mı mu mü değil var yok kadar sonra önce göre diye ise hem bile şey".split()
)

ENGLISH_STOPWORDS = frozenset(
    "the and is of to that this with for are was be by from which you not have were has been will would".split()
)

_UPPER_MAP = str.maketrans({"i": "İ", "ı": "I"})
_LOWER_MAP = str.maketrans({"İ": "i", "I": "ı"})

# UTF-8 bytes of Turkish letters read as cp1252: a lead byte shown as Ã/Ä/Å followed by a
# continuation byte shown as a Latin-1 supplement or cp1252 punctuation character.
_MOJIBAKE = re.compile("[ÃÄÅ][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W\d_]+)*")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def lower(text: str) -> str:
    """Turkish lower case: İ→i, I→ı, everything else as ``str.lower`` (same length as the input)."""
    return text.translate(_LOWER_MAP).lower()


def upper(text: str) -> str:
    """Turkish upper case: i→İ, ı→I."""
    return text.translate(_UPPER_MAP).upper()


def casefold(text: str) -> str:
    """Caseless matching key for Turkish (Turkish lower case, then ``casefold``)."""
    return lower(text).casefold()


def looks_mojibake(text: str) -> bool:
    """Cheap check for UTF-8-read-as-cp1252 pairs (``Ã¼``, ``ÅŸ``, ``Ä±`` ...)."""
    return _MOJIBAKE.search(text) is not None


def fix_mojibake(text: str) -> str:
    """Repair mojibake with ftfy, only when ``looks_mojibake`` fires (clean text is returned as is)."""
    if not looks_mojibake(text):
        return text
    import ftfy

    return ftfy.fix_encoding(text)


def normalize(text: str, fix_encoding: bool = True) -> str:
    """Mojibake repair (if it looks broken), then Unicode NFC."""
    if fix_encoding:
        text = fix_mojibake(text)
    return unicodedata.normalize("NFC", text)


def control_ratio(text: str) -> float:
    """Share of characters that are control characters (tab/newline excluded)."""
    return len(_CONTROL.findall(text)) / len(text) if text else 0.0


def split_words(text: str) -> list[str]:
    """Words for fertility counts: letters/digits, with an apostrophe suffix kept (``Türkiye'nin``)."""
    return _WORD.findall(text)


def vowel_harmony(word: str) -> bool | None:
    """Major vowel harmony: True if all vowels are back or all front; None with fewer than two vowels."""
    vowels = [c for c in lower(word) if c in VOWELS]
    if len(vowels) < 2:
        return None
    return all(v in BACK_VOWELS for v in vowels) or all(v in FRONT_VOWELS for v in vowels)


def vowel_harmony_rate(text: str) -> float:
    """Share of words (with at least two vowels) that obey major vowel harmony; 0.0 if there are none."""
    checks = [h for h in map(vowel_harmony, split_words(text)) if h is not None]
    return sum(checks) / len(checks) if checks else 0.0


def turkish_score(text: str) -> float:
    """0..1: how Turkish a text looks (stopword share and Turkish-letter share; see module docstring)."""
    words = [lower(w) for w in split_words(text)]
    letters = [c for c in text if c.isalpha()]
    if not words or not letters:
        return 0.0
    stop = sum(w in STOPWORDS for w in words) / len(words)
    tr = sum(c in TURKISH_LETTERS for c in letters) / len(letters)
    harmony = [h for h in map(vowel_harmony, words) if h is not None]
    harm = sum(harmony) / len(harmony) if harmony else 0.0
    english = sum(w in ENGLISH_STOPWORDS for w in words) / len(words)
    score = 0.4 * min(1.0, stop / 0.12) + 0.4 * min(1.0, tr / 0.04) + 0.2 * min(1.0, max(0.0, (harm - 0.5) / 0.3))
    return score * (1.0 - min(1.0, english / 0.1))


# --------------------------------------------------------------------------------------------
# Suffix inventory and segmentation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suffix:
    form: str
    slot: int
    category: str


@functools.lru_cache(maxsize=1)
def suffix_inventory() -> tuple[Suffix, ...]:
    """Every (allomorph, slot, category) row of ``trkit/data/turkish_suffixes.tsv``."""
    text = resources.files("trkit").joinpath("data/turkish_suffixes.tsv").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        forms, slot, category, *_ = line.split("\t")
        rows.extend(Suffix(f.strip(), int(slot), category) for f in forms.split(","))
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def _slots_by_form() -> dict[str, tuple[int, ...]]:
    out: dict[str, set[int]] = {}
    for s in suffix_inventory():
        out.setdefault(s.form, set()).add(s.slot)
    return {k: tuple(sorted(v)) for k, v in out.items()}


@functools.lru_cache(maxsize=1)
def _max_suffix_len() -> int:
    return max(len(f) for f in _slots_by_form())


def _suffix_parses(w: str) -> list[tuple[str, ...] | None]:
    """For every start position i: the fewest-suffix parse of ``w[i:]`` with a valid slot order, or None.

    Right-to-left dynamic programme: ``by_slot[i]`` maps the slot of the first suffix to the best
    parse of ``w[i:]`` that starts with a suffix of that slot.
    """
    forms = _slots_by_form()
    longest = _max_suffix_len()
    n = len(w)
    by_slot: list[dict[int, tuple[str, ...]]] = [{} for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        here = by_slot[i]
        for j in range(i + 1, min(n, i + longest) + 1):
            slots = forms.get(w[i:j])
            if not slots:
                continue
            for slot in slots:
                if j == n:
                    cands = [()]
                else:
                    cands = [t for s2, t in by_slot[j].items() if s2 > slot or s2 == slot == 1]
                for tail in cands:
                    old = here.get(slot)
                    if old is None or len(tail) + 1 < len(old):
                        here[slot] = (w[i:j],) + tail
    return [min(d.values(), key=len) if d else None for d in by_slot]


STEM_RATIO = 0.5  # a stem must be at least this frequent relative to the whole word
_SOFTENED = {"b": "p", "c": "ç", "d": "t", "ğ": "k"}


def _stem_count(stem: str, lexicon: Mapping[str, int]) -> int:
    n = lexicon.get(stem, 0)
    if stem and stem[-1] in _SOFTENED:  # kitab-ı <- kitap, ağac-ı <- ağaç, reng-i <- renk
        n = max(n, lexicon.get(stem[:-1] + _SOFTENED[stem[-1]], 0))
    return n


def segment(word: str, lexicon: Mapping[str, int] | None = None) -> list[str]:
    """Split one word into [stem, suffix, suffix, ...] (lower-cased, Turkish rules); [word] if none.

    With ``lexicon`` (lower-cased word -> count, e.g. from the corpus) the stem is the shortest one
    the lexicon knows (at least STEM_RATIO of the whole word's count); without it, the shortest plausible stem.
    An apostrophe marks the stem boundary of proper nouns (``Türkiye'nin``).
    """
    w = lower(word)
    if "'" in w or "’" in w:
        stem, _, rest = w.replace("’", "'").partition("'")
        chain = list(_suffix_parses(rest)[0] or ()) if rest else None
        return [stem] + (chain if chain else ([rest] if rest else []))
    if not w.isalpha():
        return [w]
    parses = _suffix_parses(w)
    candidates = [
        (w[:j], list(parses[j]))
        for j in range(2, len(w))
        if parses[j] is not None and any(c in VOWELS for c in w[:j])
    ]
    if not candidates:
        return [w]
    if lexicon is not None:
        # the shortest stem (>= 3 letters) that is itself a word at least STEM_RATIO times as frequent as the whole word
        whole = lexicon.get(w, 0)
        for stem, chain in candidates:
            if len(stem) >= 3 or (len(stem) == 2 and len(chain[0]) >= 2):
                n = _stem_count(stem, lexicon)
                if n > 0 and n >= STEM_RATIO * whole:
                    return [stem] + chain
        return [w]
    for stem, chain in candidates:
        if _plausible_stem(stem) and len(chain[0]) >= 2:
            return [stem] + chain
    return [w]


def _plausible_stem(stem: str) -> bool:
    """At least three letters with a vowel, not ending in a consonant cluster Turkish roots avoid
    (a final cluster must start with l, m, n, r, s, ş or y: kurt, renk, üst are fine, *evl is not)."""
    if len(stem) < 3 or not any(c in VOWELS for c in stem):
        return False
    a, b = stem[-2], stem[-1]
    return a in VOWELS or b in VOWELS or a in "lmnrsşy"


def suffix_boundaries(word: str, lexicon: Mapping[str, int] | None = None) -> list[int]:
    """Character offsets inside ``word`` where a morph boundary lies (stem|suffix and suffix|suffix)."""
    parts = segment(word, lexicon)
    out, pos = [], 0
    for p in parts[:-1]:
        pos += len(p)
        out.append(pos)
        if word[pos:pos + 1] in ("'", "’"):  # the apostrophe belongs to neither side
            pos += 1
    return out


def stem_boundary(word: str, lexicon: Mapping[str, int] | None = None) -> int | None:
    """Character offset of the stem|suffix boundary, or None if the word has no suffix."""
    b = suffix_boundaries(word, lexicon)
    return b[0] if b else None


def build_lexicon(words: Iterable[tuple[str, int]], min_count: int = 2) -> dict[str, int]:
    """Lower-cased alphabetic word -> summed count, from (word, count) pairs (e.g. corpus words)."""
    lex: dict[str, int] = {}
    for w, n in words:
        w = lower(w.strip())
        if w.isalpha():
            lex[w] = lex.get(w, 0) + n
    return {w: n for w, n in lex.items() if n >= min_count}
