"""Turkish text utilities: casing, mojibake, words, vowel harmony, language score, suffix segmentation."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trkit import turkish as T

LETTERS = "abcçdefgğhıijklmnoöprsştuüvyzABCÇDEFGĞHIİJKLMNOÖPRSŞTUÜVYZ"


def test_casing_dotted_and_dotless_i():
    assert T.lower("İSTANBUL IĞDIR") == "istanbul ığdır"
    assert T.upper("istanbul ığdır") == "İSTANBUL IĞDIR"
    assert "İ".lower() != T.lower("İ") == "i"  # Python's own lower adds U+0307
    assert T.casefold("IŞIK") == T.casefold("ışık")
    assert T.casefold("İzmir") == T.casefold("izmir") != T.casefold("Izmir")


@given(st.text(alphabet=LETTERS + " '.,", max_size=60))
def test_casing_roundtrip_and_length(text):
    assert len(T.lower(text)) == len(text) == len(T.upper(text))
    assert T.lower(T.upper(text)) == T.lower(text)
    assert T.upper(T.lower(text)) == T.upper(text)


def test_mojibake_repaired_only_when_broken():
    broken = "TÃ¼rkiye'nin eÄŸitim sisteminde Ã¶ÄŸrenciler ÅŸehirde Ä±lÄ±k"
    assert T.looks_mojibake(broken)
    assert T.fix_mojibake(broken) == "Türkiye'nin eğitim sisteminde öğrenciler şehirde ılık"
    clean = "Türkiye'nin eğitim sisteminde öğrenciler şehirde ılık"
    assert not T.looks_mojibake(clean)
    assert T.fix_mojibake(clean) is clean


@given(st.text(alphabet=LETTERS + " .,;:!?'\"()-0123456789", max_size=80))
def test_clean_turkish_text_is_never_touched(text):
    assert not T.looks_mojibake(text)
    assert T.normalize(text) == text


def test_normalize_nfc():
    decomposed = "s\u0327ehir gu\u0308zel g\u0306"
    assert T.normalize(decomposed) == "şehir güzel ğ" == unicodedata.normalize("NFC", decomposed)


def test_split_words_keeps_apostrophe_suffixes():
    assert T.split_words("Türkiye'nin başkenti Ankara’dır, 2023'te (yeni) dönem.") == [
        "Türkiye'nin", "başkenti", "Ankara’dır", "2023'te", "yeni", "dönem"]
    assert T.split_words("...  --  ") == []


def test_vowel_harmony():
    assert T.vowel_harmony("çocuklarımızdan") is True
    assert T.vowel_harmony("evlerimizde") is True
    assert T.vowel_harmony("kitapçı") is False  # loanword: i then a
    assert T.vowel_harmony("gel") is None
    assert T.vowel_harmony_rate("Çocuklar okulda oynuyorlar.") == 1.0
    en = "The committee reviewed the proposal and published its conclusions yesterday"
    assert T.vowel_harmony_rate(en) < 0.6 < T.vowel_harmony_rate("Öğretmenler öğrencilerle bahçede konuştular")
    assert T.vowel_harmony_rate("") == 0.0


def test_turkish_score_separates_languages():
    tr = "Bu kitap çok güzel ve öğretici, herkese tavsiye ederim."
    en = "This book is very nice and instructive, I recommend it to everyone."
    assert T.turkish_score(tr) > 0.7
    assert T.turkish_score(en) < 0.1
    assert T.turkish_score("") == 0.0
    assert 0.0 <= T.turkish_score("Ali okula gitti") <= 1.0


def test_control_ratio():
    assert T.control_ratio("abc\x00") == 0.25
    assert T.control_ratio("satır\tsekme\n") == 0.0


def test_suffix_inventory_is_well_formed():
    inv = T.suffix_inventory()
    assert len(inv) > 300
    assert {s.slot for s in inv} == set(range(1, 10))
    assert all(s.form and s.form == T.lower(s.form) and s.form.isalpha() for s in inv)
    cats = {s.category for s in inv}
    assert {"plural", "case", "possessive", "tense", "copula", "derivational"} <= cats


@pytest.mark.parametrize("word,parts", [  # without a lexicon: the shortest plausible stem
    ("kitaplarımızdan", ["kitap", "lar", "ımız", "dan"]),
    ("geliyorum", ["gel", "iyor", "um"]),
    ("memleketimizin", ["memleket", "imiz", "in"]),
    ("evlerinde", ["evleri", "nde"]),  # *evl is not a plausible stem
    ("gözlük", ["göz", "lük"]),
    ("kalem", ["kalem"]),
    ("İstanbul'da", ["istanbul", "da"]),
])
def test_segment_without_lexicon(word, parts):
    assert T.segment(word) == parts


@pytest.mark.parametrize("word,parts", [
    ("kitaplarımızdan", ["kitap", "lar", "ımız", "dan"]),
    ("geliyorum", ["gel", "iyor", "um"]),
    ("gelemeyeceklerdi", ["gel", "eme", "yecek", "ler", "di"]),
    ("kitabı", ["kitab", "ı"]),  # consonant softening: kitap -> kitab-ı
])
def test_segment_with_lexicon(word, parts):
    lex = {"kitap": 50, "gel": 20, "geliyor": 8}
    assert T.segment(word, lex) == parts


def test_segment_with_lexicon_prefers_known_stems_and_keeps_frequent_words_whole():
    lex = {"ev": 500, "evler": 80, "kadın": 300, "kadı": 4, "öğrenci": 90, "öğrenciler": 60}
    assert T.segment("evlerinde", lex) == ["ev", "leri", "nde"]
    assert T.segment("kadın", lex) == ["kadın"]  # a frequent whole word, not kadı + n
    assert T.segment("öğrenciler", lex) == ["öğrenci", "ler"]


@given(st.text(alphabet=LETTERS, min_size=1, max_size=20))
def test_boundaries_are_inside_the_word_and_increasing(word):
    b = T.suffix_boundaries(word)
    assert b == sorted(set(b))
    assert all(0 < x < len(word) for x in b)
    assert T.stem_boundary(word) == (b[0] if b else None)


def test_boundaries_skip_the_apostrophe():
    assert T.suffix_boundaries("Türkiye'nin") == [7]
    assert T.suffix_boundaries("Ankara'dakiler")[0] == 6


def test_build_lexicon():
    lex = T.build_lexicon([("Ev", 3), ("ev", 2), (" ", 9), ("Kitap1", 5), ("İzmir", 1)], min_count=2)
    assert lex == {"ev": 5}
