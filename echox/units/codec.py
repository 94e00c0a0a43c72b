"""Speech units and the unit language.

Units are cluster ids of speech frames. Consecutive duplicates are removed (the durations are
kept for the vocoder), then a BPE vocabulary learned over deduplicated sequences lets one
unit-language token cover several units. Each unit id is mapped to one private-use Unicode
character so a standard tokenizer library (HF tokenizers) can learn and apply the merges; with
no pre-tokenizer a whole sequence is one "word", so merges may span any adjacent units.

Token ids are laid out so that token u is the single unit u (u < num_units), followed by the
merged tokens in merge order: the identity codec is then literally "token id == unit id".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, trainers

from echox.errors import ModelLoadError

FORMAT_VERSION = 1
FORMAT_NAME = "echox-unit-language"
_FIRST_SYMBOL = 0xE000  # Unicode private-use area: no normalizer or text ever touches it
_MAX_UNITS = 0xF8FF - _FIRST_SYMBOL + 1  # 6400 symbols in the BMP private-use block

Merge = tuple[str, str]


def dedup(units: Sequence[int]) -> tuple[list[int], list[int]]:
    """Removes consecutive duplicates: returns (deduplicated units, run lengths)."""
    out: list[int] = []
    durations: list[int] = []
    for unit in units:
        if out and out[-1] == unit:
            durations[-1] += 1
        else:
            out.append(int(unit))
            durations.append(1)
    return out, durations


def expand(units: Sequence[int], durations: Sequence[int]) -> list[int]:
    """The inverse of dedup: repeats each unit by its duration (each >= 1)."""
    if len(units) != len(durations):
        raise ValueError(f"{len(units)} units but {len(durations)} durations")
    if any(int(d) < 1 for d in durations):
        raise ValueError("every duration must be >= 1")
    return [int(u) for u, d in zip(units, durations, strict=True) for _ in range(int(d))]


def _symbol(unit: int) -> str:
    return chr(_FIRST_SYMBOL + unit)


def unit_symbols(units: Sequence[int]) -> str:
    """The spelling of a unit sequence that merges are written in (one symbol per unit)."""
    return "".join(_symbol(int(u)) for u in units)


def _text(units: Sequence[int], num_units: int) -> str:
    """Units → one symbol each; out-of-range ids would be silently dropped by BPE, so refuse them."""
    bad = [int(u) for u in units if not 0 <= int(u) < num_units]
    if bad:
        raise ValueError(f"unit ids out of range [0, {num_units}): {bad[:5]}")
    return "".join(_symbol(int(u)) for u in units)


def _build(num_units: int, merges: Sequence[Merge]) -> Tokenizer:
    """A bare BPE tokenizer: single units first (id == unit), then each new merge in order."""
    vocab = {_symbol(u): u for u in range(num_units)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))  # two merges may spell the same token
    return Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))


def _merges_of(model_state: dict[str, Any]) -> list[Merge]:
    """Merges from a tokenizers BPE state; older tokenizers wrote "left right" strings."""
    merges: list[Merge] = []
    for merge in model_state["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merges.append((str(left), str(right)))
    return merges


class UnitLanguageCodec:
    """Deduplicated units ↔ unit-language token ids (0 … vocab_size − 1)."""

    def __init__(self, num_units: int, merges: Sequence[Merge] = ()) -> None:
        if not 1 <= num_units <= _MAX_UNITS:
            raise ValueError(f"num_units must be in [1, {_MAX_UNITS}], got {num_units}")
        self._num_units = num_units
        self._merges = [(left, right) for left, right in merges]
        self._tokenizer = _build(num_units, self._merges)
        vocab = self._tokenizer.get_vocab()
        self._pieces: list[tuple[int, ...]] = [()] * len(vocab)
        for piece, token_id in vocab.items():
            units = tuple(ord(ch) - _FIRST_SYMBOL for ch in piece)
            if not units or not all(0 <= u < num_units for u in units):
                raise ValueError(f"token {token_id} is not made of units in [0, {num_units})")
            self._pieces[token_id] = units

    @property
    def num_units(self) -> int:
        return self._num_units

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def __repr__(self) -> str:
        return f"UnitLanguageCodec(num_units={self._num_units}, vocab_size={self.vocab_size})"

    @classmethod
    def identity(cls, num_units: int) -> UnitLanguageCodec:
        """No merges: one token per unit, token id == unit id (for random-init models)."""
        return cls(num_units)

    @classmethod
    def train(cls, sequences: Iterable[Sequence[int]], num_units: int, vocab_size: int) -> UnitLanguageCodec:
        """Learns up to `vocab_size` tokens over unit sequences (deduplicated here if they are not).

        Every single unit is in the base alphabet, so any sequence encodes even if a unit never
        occurs in training. The result may hold fewer than `vocab_size` tokens when the data runs
        out of pairs to merge; read `vocab_size` on the codec. Training is deterministic.
        """
        if not 1 <= num_units <= _MAX_UNITS:
            raise ValueError(f"num_units must be in [1, {_MAX_UNITS}], got {num_units}")
        if vocab_size < num_units:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the {num_units} units it must cover")
        texts = [_text(dedup(seq)[0], num_units) for seq in sequences]
        alphabet = [_symbol(u) for u in range(num_units)]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, limit_alphabet=num_units, show_progress=False
        )
        trained = Tokenizer(models.BPE())
        trained.train_from_iterator(texts, trainer=trainer)
        # The trainer numbers the alphabet its own way; keep its merges, renumber the tokens.
        return cls(num_units, _merges_of(json.loads(trained.to_str())["model"]))

    def encode(self, units: Sequence[int]) -> list[int]:
        """Deduplicated units → token ids. Raises ValueError for unit ids outside [0, num_units)."""
        text = _text(units, self._num_units)
        return list(self._tokenizer.encode(text).ids) if text else []

    def decode(self, token_ids: Sequence[int]) -> list[int]:
        """Token ids → deduplicated units. Raises ValueError for ids outside [0, vocab_size)."""
        out: list[int] = []
        for token_id in token_ids:
            if not 0 <= int(token_id) < len(self._pieces):
                raise ValueError(f"unit-language id {token_id} out of range [0, {len(self._pieces)})")
            out.extend(self._pieces[int(token_id)])
        return out

    def compression_ratio(self, sequences: Iterable[Sequence[int]]) -> float:
        """Total deduplicated units / total unit-language tokens (1.0 for no tokens at all)."""
        units = tokens = 0
        for seq in sequences:
            units += len(seq)
            tokens += len(self.encode(seq))
        return units / tokens if tokens else 1.0

    def save(self, path: str | Path) -> None:
        """Writes one JSON file (by convention `unit_language.json`) holding the whole codec."""
        payload = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_units": self._num_units,
            "vocab_size": self.vocab_size,
            "tokenizer": json.loads(self._tokenizer.to_str()),
        }
        Path(path).write_text(json.dumps(payload, ensure_ascii=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> UnitLanguageCodec:
        """Reads a file written by `save`; ModelLoadError with a one-line reason otherwise."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"no unit-language file at {path}")
        try:
            payload: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise ModelLoadError(f"{path} is not a unit-language file")
        version = payload.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ModelLoadError(f"{path}: format_version {version!r} is not a positive integer")
        if version > FORMAT_VERSION:
            raise ModelLoadError(
                f"{path} has unit-language format {version}, written by a newer echox (this one reads {FORMAT_VERSION})"
            )
        codec = _codec_from_payload(payload, path)
        if codec.vocab_size != payload.get("vocab_size"):
            raise ModelLoadError(f"{path}: vocab_size {payload.get('vocab_size')!r} but {codec.vocab_size} tokens")
        return codec


def _codec_from_payload(payload: dict[str, Any], path: Path) -> UnitLanguageCodec:
    """Rebuilds from units and merges only, so a stray normalizer or dropout in the file cannot
    change encodings; the stored vocabulary must match the rebuilt one exactly."""
    try:
        num_units = payload["num_units"]
        model = payload["tokenizer"]["model"]
        if not isinstance(num_units, int) or model.get("type") != "BPE" or model.get("dropout") is not None:
            raise ValueError("expected an integer num_units and a plain BPE model")
        codec = UnitLanguageCodec(num_units, _merges_of(model))
        if model["vocab"] != codec._tokenizer.get_vocab():
            raise ValueError("the stored vocabulary does not match its merges")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: corrupt unit-language vocabulary ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # tokenizers raises a bare Exception for an inconsistent BPE model
        raise ModelLoadError(f"{path}: corrupt unit-language vocabulary ({exc})") from None
    return codec
