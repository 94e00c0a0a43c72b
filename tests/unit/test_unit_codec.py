"""Units: dedup/expand, the unit-language codec (train, encode/decode, save/load)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echox.errors import ModelLoadError
from echox.units import UnitLanguageCodec, dedup, expand
from echox.units.codec import FORMAT_VERSION

pytestmark = pytest.mark.unit

NUM_UNITS = 24


def _repetitive_corpus(seed: int = 0, n: int = 200) -> list[list[int]]:
    """Sequences stitched from a few recurring unit 'words', like speech units of repeated syllables."""
    rng = random.Random(seed)
    words = [dedup([rng.randrange(NUM_UNITS) for _ in range(rng.randint(2, 6))])[0] for _ in range(12)]
    corpus = []
    for _ in range(n):
        seq: list[int] = []
        for _ in range(rng.randint(2, 20)):
            seq += rng.choice(words)
        corpus.append(dedup(seq)[0])
    return corpus


@pytest.fixture(scope="module")
def trained() -> UnitLanguageCodec:
    return UnitLanguageCodec.train(_repetitive_corpus(), num_units=NUM_UNITS, vocab_size=96)


dedup_sequences = st.lists(st.integers(0, NUM_UNITS - 1), max_size=80).map(lambda s: dedup(s)[0])


# --- dedup / expand ---------------------------------------------------------------------------


@given(st.lists(st.integers(0, 9), max_size=60))
def test_dedup_expand_round_trip(units: list[int]) -> None:
    out, durations = dedup(units)
    assert expand(out, durations) == units
    assert all(a != b for a, b in itertools.pairwise(out))
    assert all(d >= 1 for d in durations) and sum(durations) == len(units)


def test_dedup_example() -> None:
    assert dedup([3, 3, 3, 1, 1, 3]) == ([3, 1, 3], [3, 2, 1])
    assert dedup([]) == ([], [])


@pytest.mark.parametrize(
    ("units", "durations"), [([1, 2], [1]), ([1], [0]), ([1], [-2])], ids=["length-mismatch", "zero", "negative"]
)
def test_expand_rejects_bad_durations(units: list[int], durations: list[int]) -> None:
    with pytest.raises(ValueError):
        expand(units, durations)


# --- training and the round trip ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(dedup_sequences)
def test_trained_codec_round_trip(trained: UnitLanguageCodec, units: list[int]) -> None:
    tokens = trained.encode(units)
    assert all(0 <= t < trained.vocab_size for t in tokens)
    assert trained.decode(tokens) == units


@settings(max_examples=15, deadline=None)
@given(st.lists(dedup_sequences, min_size=1, max_size=8), st.integers(NUM_UNITS, NUM_UNITS + 40), dedup_sequences)
def test_any_training_set_round_trips(corpus: list[list[int]], vocab_size: int, probe: list[int]) -> None:
    codec = UnitLanguageCodec.train(corpus, NUM_UNITS, vocab_size)
    assert NUM_UNITS <= codec.vocab_size <= vocab_size
    for units in [*corpus, probe]:
        assert codec.decode(codec.encode(units)) == units


def test_training_learns_merges_and_compresses(trained: UnitLanguageCodec) -> None:
    assert trained.num_units == NUM_UNITS and trained.vocab_size == 96
    held_out = _repetitive_corpus(seed=0, n=300)[200:]  # same 'words', unseen sequences
    assert trained.compression_ratio(held_out) > 1.5


def test_training_is_deterministic(trained: UnitLanguageCodec, tmp_path: Path) -> None:
    again = UnitLanguageCodec.train(_repetitive_corpus(), num_units=NUM_UNITS, vocab_size=96)
    trained.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_single_units_keep_their_ids(trained: UnitLanguageCodec) -> None:
    # Every unit encodes, even one never seen in training, and token u is unit u.
    unseen = UnitLanguageCodec.train([[0, 1, 0, 1]], num_units=NUM_UNITS, vocab_size=NUM_UNITS + 4)
    for codec in (trained, unseen):
        assert [codec.encode([u]) for u in range(NUM_UNITS)] == [[u] for u in range(NUM_UNITS)]


def test_training_dedups_its_input() -> None:
    # Runs of one unit must not become tokens: encode only ever sees deduplicated units.
    codec = UnitLanguageCodec.train([[5, 5, 5, 5, 6, 6, 6]] * 10, num_units=8, vocab_size=20)
    assert codec.vocab_size == 9
    assert codec.decode([8]) == [5, 6]


def test_identity_codec() -> None:
    codec = UnitLanguageCodec.identity(10)
    assert (codec.num_units, codec.vocab_size) == (10, 10)
    units = [3, 1, 4, 1, 5, 9, 2, 6]
    assert codec.encode(units) == units and codec.decode(units) == units
    assert codec.compression_ratio([units, [0, 1, 2]]) == 1.0
    assert codec.encode([]) == [] and codec.decode([]) == []


@pytest.mark.parametrize(
    ("call", "arg"),
    [("encode", [1, NUM_UNITS]), ("encode", [-1]), ("decode", [96]), ("decode", [-1])],
    ids=["unit-too-big", "unit-negative", "token-too-big", "token-negative"],
)
def test_out_of_range_ids_raise(trained: UnitLanguageCodec, call: str, arg: list[int]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        getattr(trained, call)(arg)


@pytest.mark.parametrize(
    ("corpus", "num_units", "vocab_size"),
    [([[0, 1]], 8, 7), ([[0, 8]], 8, 16), ([[0, 1]], 0, 4)],
    ids=["vocab-below-units", "unit-out-of-range", "no-units"],
)
def test_train_rejects_bad_arguments(corpus: list[list[int]], num_units: int, vocab_size: int) -> None:
    with pytest.raises(ValueError):
        UnitLanguageCodec.train(corpus, num_units, vocab_size)


# --- the file format ---------------------------------------------------------------------------


def test_save_load_round_trip(trained: UnitLanguageCodec, tmp_path: Path) -> None:
    path = tmp_path / "unit_language.json"
    trained.save(path)
    payload = json.loads(path.read_text())
    assert payload["format_version"] == FORMAT_VERSION
    assert (payload["num_units"], payload["vocab_size"]) == (NUM_UNITS, 96)
    assert payload["tokenizer"]["model"]["type"] == "BPE"
    loaded = UnitLanguageCodec.load(path)
    assert (loaded.num_units, loaded.vocab_size) == (trained.num_units, trained.vocab_size)
    for units in _repetitive_corpus(seed=3, n=40):
        assert loaded.encode(units) == trained.encode(units)


def _edit(payload: dict[str, Any], change: str) -> Any:
    if change == "newer":
        payload["format_version"] = FORMAT_VERSION + 1
    elif change == "no-version":
        del payload["format_version"]
    elif change == "not-a-codec":
        payload = {"hello": "world"}
    elif change == "vocab-size":
        payload["vocab_size"] += 1
    elif change == "dangling-merge":
        payload["tokenizer"]["model"]["merges"].append(["\ue000", "\uf000"])
    elif change == "vocab-mismatch":
        payload["tokenizer"]["model"]["vocab"]["\ue000"] = 5
    elif change == "dropout":
        payload["tokenizer"]["model"]["dropout"] = 0.5
    elif change == "no-tokenizer":
        del payload["tokenizer"]
    return payload


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("newer", "newer echox"),
        ("no-version", "format_version"),
        ("not-a-codec", "not a unit-language file"),
        ("vocab-size", "vocab_size"),
        ("dangling-merge", "corrupt"),
        ("vocab-mismatch", "corrupt"),
        ("dropout", "corrupt"),
        ("no-tokenizer", "corrupt"),
    ],
)
def test_bad_files_raise_model_load_error(trained: UnitLanguageCodec, tmp_path: Path, change: str, match: str) -> None:
    path = tmp_path / "unit_language.json"
    trained.save(path)
    path.write_text(json.dumps(_edit(json.loads(path.read_text()), change)))
    with pytest.raises(ModelLoadError, match=match) as info:
        UnitLanguageCodec.load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [None, b"{broken", b"\xff\xfe\x00"], ids=["missing", "truncated", "binary"])
def test_missing_or_unreadable_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "unit_language.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError):
        UnitLanguageCodec.load(path)
