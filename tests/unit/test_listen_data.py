"""training.listen_data: spoken questions, rendition plans, cached encoder states, turn layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echox.audio import SAMPLE_RATE, write_wav
from echox.checkpoint import EchoX
from echox.tokenizer import Turn, byte_level_tokenizer
from training import listen_data
from training.augment import AugmentSettings
from training.listen_data import (
    CLEAN,
    Rendition,
    batch_indices,
    build_examples,
    collate,
    encode_audios,
    encode_renditions,
    load_spoken_questions,
    plan_renditions,
    rendition_audio,
    sample_clips,
    spoken_turn_ids,
)
from training.text_data import IGNORE_INDEX, load_facts

FACTS = [
    {"id": "capital-0", "category": "capital", "slots": {"country": "France"},
     "answer": "The capital of France is Paris.", "key": ["Paris"]},
    {"id": "capital-1", "category": "capital", "slots": {"country": "Spain"},
     "answer": "The capital of Spain is Madrid.", "key": ["Madrid"]},
    {"id": "color-0", "category": "color", "slots": {"thing": "snow"},
     "answer": "Snow is white.", "key": ["white"]},
]
QUESTIONS = {"capital-0": "What is the capital of France?", "capital-1": "What is the capital of Spain?",
             "color-0": "What color is snow?"}
TRAIN_VOICES, DEV_VOICES = ("m1", "m2", "f1"), ("f3",)


def tone(seconds: float, frequency: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * frequency * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(
        np.float32
    )


def make_spoken_run(run: Path, facts_dir: Path, renditions: int = 2) -> None:
    """A fact base of three facts and synth's question clips (tones standing in for speech: one
    pitch per question, one loudness per voice) in three train voices and one dev voice."""
    facts_dir.mkdir(parents=True, exist_ok=True)
    (facts_dir / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    synth = run / "synth"
    rows = []
    for q, (fact_id, text) in enumerate(QUESTIONS.items()):
        for v, voice in enumerate(TRAIN_VOICES + DEV_VOICES):
            for r in range(renditions):
                clip_id = f"q-{fact_id}-{voice}-r{r}"
                path = f"audio/questions/{clip_id}.wav"
                (synth / path).parent.mkdir(parents=True, exist_ok=True)
                write_wav(synth / path, tone(0.5 + 0.1 * q + 0.05 * r, 200.0 + 150.0 * q, 0.2 + 0.1 * v))
                split = "dev" if voice in DEV_VOICES else "train"
                rows.append({"id": clip_id, "fact_id": fact_id, "split": split, "voice": voice, "rate": 150,
                             "pitch": 50, "text": text, "path": path, "seconds": 0.5})
    (synth / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (synth / "DONE").write_text("{}\n")


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spoken")
    make_spoken_run(root / "run", root / "facts")
    return root / "run", root / "facts"


def questions(spoken: tuple[Path, Path], split: str | None = "train") -> list[listen_data.SpokenQuestion]:
    run, facts_dir = spoken
    return load_spoken_questions(run / "synth", {f.id: f for f in load_facts(facts_dir)}, split)


def test_questions_are_joined_with_their_facts(spoken: tuple[Path, Path]) -> None:
    train, dev = questions(spoken, "train"), questions(spoken, "dev")
    assert len(train) == 3 * 3 * 2 and len(dev) == 3 * 2
    clip = next(q for q in train if q.fact_id == "capital-1")
    assert clip.text == "What is the capital of Spain?"
    assert clip.answer == "The capital of Spain is Madrid." and clip.key == ("Madrid",)
    assert clip.path.is_absolute() and clip.path.is_file()


def test_plan_spreads_clean_clips_over_voices_then_augments(spoken: tuple[Path, Path]) -> None:
    train = questions(spoken)
    plan = plan_renditions(train, clean_per_text=3, augmented_per_text=2, seed=5)
    assert len(plan) == 3 * (3 + 2)
    for text in QUESTIONS.values():
        mine = [r for r in plan if r.question.text == text]
        clean = [r for r in mine if r.variant == CLEAN]
        assert len(clean) == 3 and len({r.question.voice for r in clean}) == 3  # every train voice once
        augmented = [r for r in mine if r.variant != CLEAN]
        assert len(augmented) == 2 and not {r.question.id for r in augmented} & {r.question.id for r in clean}
    assert [r.key for r in plan] == [r.key for r in plan_renditions(train, 3, 2, seed=5)]
    assert len({r.key for r in plan_renditions(train, 1, 9, seed=5)}) == 3 * 10  # more renditions than clips


def test_rendition_audio_is_clean_or_a_reproducible_augmentation(spoken: tuple[Path, Path]) -> None:
    clip = questions(spoken)[0]
    settings = AugmentSettings(noise_prob=1.0)
    clean = rendition_audio(Rendition(clip), settings, seed=1)
    first = rendition_audio(Rendition(clip, 1), settings, seed=1)
    np.testing.assert_array_equal(first, rendition_audio(Rendition(clip, 1), settings, seed=1))
    assert not np.allclose(first[: len(clean)], clean[: len(first)])
    assert not np.array_equal(first, rendition_audio(Rendition(clip, 2), settings, seed=1))


def test_encoded_states_are_those_of_inference(micro_echox: EchoX) -> None:
    audios = [tone(0.7, 300.0, 0.3), tone(1.3, 500.0, 0.2)]
    states = encode_audios(micro_echox.model, audios)
    encoder = micro_echox.model.speech_encoder
    for audio, item in zip(audios, states, strict=True):
        alone = micro_echox.model.encode_states(encoder.log_mel(audio), [encoder.num_states(len(audio))])[0]
        assert item.shape == alone.shape
        torch.testing.assert_close(item, alone, rtol=1e-4, atol=1e-5)


def test_encoding_is_cached_per_encoder(
    spoken: tuple[Path, Path], micro_echox: EchoX, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_renditions(questions(spoken), 1, 1, seed=0)
    settings = AugmentSettings()
    done: list[int] = []
    first = encode_renditions(micro_echox.model, plan, settings, 0, tmp_path, batch_size=4, progress=done.append)
    assert set(first) == {r.key for r in plan} and sum(done) == len(plan)
    assert all(s.dtype == listen_data.CACHE_DTYPE and s.shape[1] == 32 for s in first.values())

    def no_encoding(*args: object) -> None:
        raise AssertionError("encoded again")

    monkeypatch.setattr(listen_data, "encode_audios", no_encoding)
    again = encode_renditions(micro_echox.model, plan, settings, 0, tmp_path)
    for key, value in first.items():
        torch.testing.assert_close(again[key], value)
    monkeypatch.undo()
    other = EchoX.random_init(micro_echox.config, seed=1)  # another encoder: the cache does not apply
    monkeypatch.setattr(listen_data, "encode_audios", no_encoding)
    with pytest.raises(AssertionError, match="encoded again"):
        encode_renditions(other.model, plan, settings, 0, tmp_path)


def test_spoken_turn_is_the_inference_prompt_then_the_answer() -> None:
    tokenizer = byte_level_tokenizer()
    history = (Turn("Hi?", "Hello."),)
    ids, labels = spoken_turn_ids(tokenizer, "Paris.", history)
    prompt = tokenizer.prompt_ids(history)
    answer = [*tokenizer.encode("Paris."), tokenizer.eos_id]
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    assert ids.count(tokenizer.audio_patch_id) == 1


def test_examples_and_batches(spoken: tuple[Path, Path], micro_echox: EchoX) -> None:
    tokenizer = micro_echox.tokenizer
    plan = plan_renditions(questions(spoken), 1, 0, seed=0)
    states = {r.key: torch.zeros(4 + i, 32) for i, r in enumerate(plan)}
    examples = build_examples(plan, states, tokenizer, {plan[0].key: (Turn("Q?", "A."),)})
    assert examples[0].input_ids[: len(tokenizer.prompt_ids())] != tuple(tokenizer.prompt_ids())
    assert examples[1].input_ids[: len(tokenizer.prompt_ids())] == tuple(tokenizer.prompt_ids())
    assert examples[1].transcript_ids == tuple(tokenizer.encode(plan[1].question.text))
    batch = collate(examples)
    assert [len(s) for s in batch.states] == [4, 5, 6]
    assert batch.keys == [r.key for r in plan]


def test_batches_cover_each_epoch_and_resume_identically() -> None:
    epoch = [batch_indices(10, 4, seed=3, step=s) for s in range(3)]
    assert sorted(i for b in epoch for i in b) == list(range(10))
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert batch_indices(10, 4, seed=3, step=4) == batch_indices(10, 4, seed=3, step=4)
    assert epoch != [batch_indices(10, 4, seed=3, step=s) for s in range(3, 6)]


def test_sample_clips_is_deterministic(spoken: tuple[Path, Path]) -> None:
    dev = questions(spoken, "dev")
    assert sample_clips(dev, 3, seed=2) == sample_clips(dev, 3, seed=2)
    assert len(sample_clips(dev, 100, seed=2)) == len(dev)
