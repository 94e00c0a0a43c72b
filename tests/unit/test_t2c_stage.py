"""Stage II (t2c): the sequence layout, the training segments, a smoke run and resume."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from echox.checkpoint import load_part_weights, read_part_config, save_part
from echox.errors import EchoXError
from echox.models.echo_decoder import EchoDecoder, EchoDecoderConfig
from echox.models.llm import build_llm
from echox.models.presets import preset_tiny
from echox.tokenizer import byte_level_tokenizer
from echox.units.codec import UnitLanguageCodec
from tests.unit.test_asr_stage import CancelAfter
from training.stage import DONE_FILE, StageCancelled, StageContext, run_stage
from training.stages import t2c
from training.text_data import Fact

NUM_UNITS = 24
ANSWERS = [
    ("a-0", "train", "Paris is big."),
    ("a-1", "train", "Rome is old. It has hills."),
    ("a-2", "train", "Two plus two is four."),
    ("a-3", "train", "Bees make honey. They fly! Do they sting?"),
    ("a-4", "train", "Snow is cold."),
    ("a-5", "dev", "Rain is wet."),
    ("a-6", "dev", "Mars is red. It is far."),
]


def fake_units(text: str) -> list[int]:
    """Deterministic stand-in units: one per letter, deduplicated."""
    units: list[int] = []
    for ch in text.lower():
        unit = ord(ch) % NUM_UNITS
        if not units or units[-1] != unit:
            units.append(unit)
    return units


def fake_renderer(calls: list[str]) -> t2c.UnitRenderer:
    def render(texts: Sequence[str]) -> list[list[int]]:
        calls.extend(texts)
        return [fake_units(text) for text in texts]

    return render


def _done(folder: Path) -> None:
    (folder / DONE_FILE).write_text("{}\n")


def make_run(run: Path) -> None:
    """Stand-in earlier stages: synth manifest, byte tokenizer + random LLM, units, codec."""
    for stage in ("synth", "lm", "units", "unit_language"):
        (run / stage).mkdir(parents=True)
    rows = [
        {
            "id": i,
            "fact_id": i[2:],
            "split": s,
            "voice": "en-us+f2",
            "rate": 150,
            "pitch": 50,
            "text": text,
            "path": f"audio/{i}.wav",
            "seconds": 1.0,
        }
        for i, s, text in ANSWERS
    ]
    (run / "synth" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = byte_level_tokenizer()
    tokenizer.save(run / "lm" / "tokenizer.json")
    llm_config = preset_tiny(vocab_size=tokenizer.vocab_size).llm.replace(num_layers=1)
    torch.manual_seed(0)
    save_part(run / "lm", "llm", build_llm(llm_config), llm_config)
    units = [
        {
            "id": r["id"],
            "fact_id": r["fact_id"],
            "split": r["split"],
            "units": fake_units(r["text"]),
            "durations": [2] * len(fake_units(r["text"])),
        }
        for r in rows
    ]
    (run / "units" / "units.jsonl").write_text("".join(json.dumps(u) + "\n" for u in units))
    codec = UnitLanguageCodec.train([u["units"] for u in units], NUM_UNITS, NUM_UNITS + 8)
    codec.save(run / "unit_language" / "unit_language.json")
    for stage in ("synth", "lm", "units", "unit_language"):
        _done(run / stage)


SMOKE = {"steps": 6, "batch_tokens": 120, "warmup_steps": 2, "eval_every": 3, "checkpoint_every": 2}


def context(run: Path, settings: dict[str, object], cancel_after: int | None = None) -> StageContext:
    ctx = StageContext(run_dir=run, stage="t2c", settings=settings, seed=7)
    if cancel_after is not None:
        ctx.reporter = CancelAfter(ctx.cancel, cancel_after)
    return ctx


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(t2c, "espeak_renderer", lambda *args: fake_renderer(calls))
    return calls


def test_sequence_targets_only_units_and_stop() -> None:
    ids, labels = t2c.build_sequence([1], [10, 11, 12], [2], [0, 5], text_vocab_size=100, stop_id=2)
    assert ids == [1, 10, 11, 12, 2, 100, 105]
    # the eos position predicts the first unit, each unit the next, the last unit the stop id
    assert labels == [-100, -100, -100, -100, 100, 105, 2]
    ids, labels = t2c.build_sequence([1], [10], [2], [], text_vocab_size=100, stop_id=2)
    assert labels == [-100, -100, 2]


def test_collate_matches_the_inference_layout() -> None:
    tokenizer = byte_level_tokenizer()
    v_text = tokenizer.vocab_size
    short = t2c.T2CExample((5,), (3,), "train", "answer")
    long = t2c.T2CExample((5, 6, 7), (1, 2), "train", "answer")
    batch = t2c.collate([short, long], tokenizer, v_text)
    assert batch.input_ids[1].tolist() == [tokenizer.bos_id, 5, 6, 7, tokenizer.eos_id, v_text + 1, v_text + 2]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert batch.labels[0].tolist() == [-100, -100, v_text + 3, tokenizer.eos_id, -100, -100, -100]
    assert batch.input_ids[0, 4:].tolist() == [tokenizer.pad_id] * 3


def test_split_sentences() -> None:
    assert t2c.split_sentences("Bees make honey. They fly! Do they sting?") == [
        "Bees make honey.",
        "They fly!",
        "Do they sting?",
    ]
    assert t2c.split_sentences("It is 3.5 metres.") == ["It is 3.5 metres."]
    assert t2c.split_sentences("  \n ") == []


def test_examples_add_sentences_of_train_answers_questions_and_phrases(tmp_path: Path) -> None:
    make_run(tmp_path)
    tokenizer = byte_level_tokenizer()
    codec = UnitLanguageCodec.load(tmp_path / "unit_language" / "unit_language.json")
    rows = t2c.answer_rows(tmp_path)
    texts = t2c.FactTexts(questions=("Is Rome old?",), vocabulary=("red green blue",))
    extra = t2c.extra_texts(rows, t2c.T2CSettings(word_repeats=2, phrase_words=(2, 2)), texts, seed=1)
    calls: list[str] = []
    examples = t2c.build_examples(rows, tokenizer, codec, extra, fake_renderer(calls), tmp_path / "p.jsonl")
    sentences = [e for e in examples if e.source == "sentence"]
    assert len(sentences) == 5  # Rome (2) + Bees (3); the dev answer about Mars adds none
    assert [e.split for e in examples if e.source == "answer"] == [s for _, s, _ in ANSWERS]
    assert all(e.split == "train" for e in examples if e.source != "answer")
    assert [e.text_ids for e in examples if e.source == "question"] == [tuple(tokenizer.encode("Is Rome old?"))]
    phrases = t2c.vocabulary_phrases(["red green blue"], 2, (2, 2), 1)
    assert [e.text_ids for e in examples if e.source == "phrase"] == [tuple(tokenizer.encode(p)) for p in phrases]
    assert "Mars is red." not in calls and "They fly!" in calls
    assert examples[-1].unit_tokens == tuple(codec.encode(fake_units(phrases[-1])))
    again: list[str] = []
    t2c.build_examples(rows, tokenizer, codec, extra, fake_renderer(again), tmp_path / "p.jsonl")
    assert again == []  # every piece came from the cache


def test_smoke_run_writes_a_loadable_decoder(tmp_path: Path, renders: list[str]) -> None:
    make_run(tmp_path)
    summary = run_stage(t2c.run, context(tmp_path, SMOKE))
    out = tmp_path / "t2c"
    config = read_part_config(out, "echo_decoder", EchoDecoderConfig)
    assert (
        config.unit_vocab_size == UnitLanguageCodec.load(tmp_path / "unit_language" / "unit_language.json").vocab_size
    )
    assert config.text_vocab_size == byte_level_tokenizer().vocab_size
    load_part_weights(out, "echo_decoder", EchoDecoder(config))
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["curves"]["loss"]) == 6 and len(metrics["curves"]["dev_accuracy"]) == 2
    assert (out / "loss.png").stat().st_size > 0
    assert summary["steps"] == 6 and 0.0 <= summary["dev_accuracy"] <= 1.0
    assert summary["train_examples"] == {"answer": 5, "sentence": 5, "question": 0, "phrase": 0, "variant": 0}
    assert json.loads((out / DONE_FILE).read_text())["steps"] == 6


@pytest.mark.parametrize(
    "changes", [{}, {"dropout": 0.3, "unit_dropout": 0.3}, {"average_decay": 0.8}], ids=["plain", "dropout", "average"]
)
def test_cancelled_run_resumes_to_the_same_weights(
    tmp_path: Path, renders: list[str], changes: dict[str, float]
) -> None:
    settings = {**SMOKE, **changes}  # resume restores the random state (dropout) and the average
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    make_run(straight)
    make_run(resumed)
    run_stage(t2c.run, context(straight, settings))
    with pytest.raises(StageCancelled):
        run_stage(t2c.run, context(resumed, settings, cancel_after=3))
    state = json.loads((resumed / "t2c" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not (resumed / "t2c" / DONE_FILE).exists()
    summary = run_stage(t2c.run, context(resumed, settings))
    assert summary["steps"] == 6
    config = read_part_config(straight / "t2c", "echo_decoder", EchoDecoderConfig)
    a = load_part_weights(straight / "t2c", "echo_decoder", EchoDecoder(config)).state_dict()
    b = load_part_weights(resumed / "t2c", "echo_decoder", EchoDecoder(config)).state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, msg=name)


def test_the_weight_average_is_the_part_and_the_last_step_is_measured_beside_it(
    tmp_path: Path, renders: list[str]
) -> None:
    from safetensors.torch import load_file

    make_run(tmp_path)
    summary = run_stage(t2c.run, context(tmp_path, {**SMOKE, "average_decay": 0.8}))
    out = tmp_path / "t2c"
    part = load_file(str(out / "echo_decoder.safetensors"))
    averaged = load_file(str(out / "checkpoint" / "average.safetensors"))
    last = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(part[name], averaged[name]) for name in part)
    assert any(not torch.equal(part[name], last[name]) for name in part)
    metrics = json.loads((out / "metrics.json").read_text())
    assert round(metrics["dev_loss"], 4) == summary["dev_loss"]  # the averaged decoder's figures
    assert metrics["last_step_dev_loss"] != metrics["dev_loss"] and 0 <= metrics["last_step_dev_accuracy"] <= 1
    with pytest.raises(EchoXError, match="average_decay"):
        t2c.T2CSettings.from_mapping({"average_decay": -0.1})


def test_dropout_reaches_the_saved_decoder_and_only_acts_in_training(tmp_path: Path, renders: list[str]) -> None:
    make_run(tmp_path)
    run_stage(t2c.run, context(tmp_path, {**SMOKE, "dropout": 0.2, "unit_dropout": 0.5}))
    config = read_part_config(tmp_path / "t2c", "echo_decoder", EchoDecoderConfig)
    assert config.dropout == 0.2 and config.to_hf().attention_dropout == 0.2
    decoder = load_part_weights(tmp_path / "t2c", "echo_decoder", EchoDecoder(config))
    embeds = torch.randn(1, 9, config.text_dim)
    decoder.eval()
    torch.testing.assert_close(decoder(embeds)[0], decoder(embeds)[0])  # inference is deterministic
    decoder.train()
    assert not torch.allclose(decoder(embeds)[0], decoder(embeds)[0])


def test_unit_dropout_blanks_only_unit_positions_at_about_its_share() -> None:
    torch.manual_seed(0)
    embeds = torch.ones(4, 500, 3)
    is_unit = torch.zeros(4, 500, dtype=torch.bool)
    is_unit[:, 100:] = True
    blanked = t2c.blank_units(embeds, is_unit, 0.25)
    zero = (blanked == 0).all(-1)
    assert not zero[:, :100].any()  # text positions are never blanked
    assert 0.2 < float(zero[:, 100:].float().mean()) < 0.3
    assert t2c.blank_units(embeds, is_unit, 0.0) is embeds


def test_time_cap_ends_the_schedule_and_says_so(tmp_path: Path, renders: list[str]) -> None:
    make_run(tmp_path)
    summary = run_stage(t2c.run, context(tmp_path, {**SMOKE, "max_minutes": 1e-6}))  # ends after one step
    assert summary["steps"] == 1 and summary["stopped_early"] is True
    state = json.loads((tmp_path / "t2c" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1 and state["extra"]["elapsed_s"] > 0


def test_answer_variants_swap_key_words_or_slots_and_never_say_a_held_out_answer() -> None:
    facts = [
        Fact("c0", "capital", {"country": "France"}, "The capital of France is Paris.", ("Paris",)),
        Fact("c1", "capital", {"country": "Spain"}, "The capital of Spain is Madrid.", ("Madrid",)),
        Fact("c2", "capital", {"country": "Italy"}, "The capital of Italy is Rome.", ("Rome",)),
        Fact("a0", "add", {"a": "two", "b": "two"}, "Two plus two is four.", ("four",)),
    ]
    rows = [{"fact_id": f.id, "text": f.answer, "split": "dev" if f.id == "c2" else "train"} for f in facts]
    variants = t2c.answer_variants(rows, facts, 20, seed=1)
    assert variants == t2c.answer_variants(rows, facts, 20, seed=1)  # deterministic
    assert "The capital of France is Rome." in variants and "The capital of Italy is Paris." in variants
    assert "The capital of Italy is Rome." not in variants  # the held-out answer itself
    assert not any(v in {f.answer for f in facts} for v in variants)
    assert all(v.startswith("The capital of") for v in variants)  # "add" has no other fact to swap with
    assert t2c.swap_words("Paris, not Parisian.", ["Paris"], ["Rome"]) == "Rome, not Parisian."
    assert t2c.swap_words("a b", ["a", "b"], ["b", "a"]) == "b a"  # swaps do not chain


def test_vocabulary_phrases_cover_every_word() -> None:
    phrases = t2c.vocabulary_phrases(["Rome is old.", "Two plus two is four."], 3, (2, 3), seed=5)
    words = [w.rstrip(".") for p in phrases for w in p.split()]
    assert sorted(set(words)) == ["Rome", "Two", "four", "is", "old", "plus", "two"]
    assert all(words.count(w) == 3 for w in set(words))
    assert all(p.endswith(".") and 1 <= len(p.split()) <= 3 for p in phrases)
    assert phrases == t2c.vocabulary_phrases(["Rome is old.", "Two plus two is four."], 3, (2, 3), seed=5)


def test_token_batches_keep_the_budget_and_resume_exactly() -> None:
    lengths = [5, 40, 7, 38, 6, 41, 8, 12, 39, 9] * 3
    batches = t2c.token_batches(lengths, 90)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) * len(b) <= 90 for b in batches)
    fresh = t2c.training_batches(lengths, 90, seed=3)
    first = [next(fresh) for _ in range(40)]  # several epochs
    resumed = t2c.training_batches(lengths, 90, seed=3, start_step=17)
    assert [next(resumed) for _ in range(23)] == first[17:]


def test_espeak_renderer_assigns_units_with_the_units_model(tmp_path: Path) -> None:
    from training.features import FeatureConfig, UnitExtractor

    generator = torch.Generator().manual_seed(0)
    centroids = torch.randn(NUM_UNITS, 80, generator=generator)
    UnitExtractor(FeatureConfig(), torch.full((80,), -5.0), torch.full((80,), 3.0), centroids).save(tmp_path)
    render = t2c.espeak_renderer(tmp_path, "en-us+f2", 150, 50)
    (short, long) = render(["Hi.", "The capital of France is Paris."])
    assert 0 < len(short) < len(long)
    assert all(0 <= u < NUM_UNITS for u in long)
    assert all(a != b for a, b in itertools.pairwise(long))  # deduplicated


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(Exception, match="unknown keys"):
        t2c.T2CSettings.from_mapping({"stepz": 3})
    with pytest.raises(EchoXError, match="must be in"):
        t2c.T2CSettings.from_mapping({"unit_dropout": 1.0})
