"""The synth stage: manifests of the contract, 16 kHz PCM16 audio, determinism, resume, splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from training.stage import StageCancelled, StageContext, run_stage
from training.stages import synth

FACTS = Path(__file__).resolve().parents[2] / "data" / "spoken_qa"
CONTRACT_FIELDS = ["id", "fact_id", "split", "voice", "rate", "pitch", "text", "path", "seconds"]
LIMIT = 2  # one capital (3 templates) and one addition (2): 5 questions × 10 voices + 2 answers
FILES = 52
SEED = 7


def _rows(corpus: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (corpus / name).read_text().splitlines()]


def _voices() -> dict[str, Any]:
    return dict(json.loads((FACTS / "voices.json").read_text()))


def _audio_bytes(corpus: Path) -> dict[str, bytes]:
    return {str(p.relative_to(corpus)): p.read_bytes() for p in sorted((corpus / "audio").rglob("*.wav"))}


def _synth(out: Path, seed: int = SEED, workers: int = 2) -> dict[str, Any]:
    return synth.synthesize_corpus(FACTS, out, seed=seed, renditions=1, workers=workers, limit=LIMIT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small corpus built through the stage entry point, as a recipe would run it."""
    run_dir = tmp_path_factory.mktemp("run")
    ctx = StageContext(
        run_dir=run_dir,
        stage="synth",
        settings={"renditions": 1, "limit": LIMIT, "workers": 2},
        facts=FACTS,
        seed=SEED,
    )
    summary = run_stage(synth.run, ctx)
    assert summary["files"] == FILES and summary["rendered"] == FILES
    return run_dir / "synth"


def test_manifests_follow_the_contract(corpus: Path) -> None:
    voices = _voices()
    questions, answers = _rows(corpus, "questions.jsonl"), _rows(corpus, "answers.jsonl")
    assert len(questions) == 5 * len(voices["train"] + voices["dev"]) and len(answers) == LIMIT
    for row in questions + answers:
        assert list(row) == CONTRACT_FIELDS
        info = sf.info(str(corpus / row["path"]))
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        assert row["seconds"] == pytest.approx(info.frames / 16_000, abs=1e-4)
        assert row["path"].startswith("audio/") and row["split"] in ("train", "dev")
    assert {row["fact_id"] for row in questions} == {row["fact_id"] for row in answers}
    assert "What is the capital of France?" in {row["text"] for row in questions}


def test_question_split_follows_the_voice_and_rates_stay_in_range(corpus: Path) -> None:
    voices = _voices()
    questions = _rows(corpus, "questions.jsonl")
    for row in questions:
        assert row["split"] == ("dev" if row["voice"] in voices["dev"] else "train")
        assert voices["rate_wpm"][0] <= row["rate"] <= voices["rate_wpm"][1]
        assert voices["pitch"][0] <= row["pitch"] <= voices["pitch"][1]
    assert {row["voice"] for row in questions} == set(voices["train"] + voices["dev"])
    assert len({(row["rate"], row["pitch"]) for row in questions}) > len(questions) // 2  # they vary


def test_answers_are_in_the_exact_agent_voice(corpus: Path) -> None:
    agent = _voices()["agent"]
    facts = {f["id"]: f for f in map(json.loads, (FACTS / "facts.jsonl").read_text().splitlines())}
    for row in _rows(corpus, "answers.jsonl"):
        assert (row["voice"], row["rate"], row["pitch"]) == (agent["voice"], agent["rate_wpm"], agent["pitch"])
        assert row["text"] == facts[row["fact_id"]]["answer"]
        assert row["id"] == f"a-{row['fact_id']}"


def test_answer_dev_split_is_a_fixed_share_of_every_category() -> None:
    facts = [json.loads(line) for line in (FACTS / "facts.jsonl").read_text().splitlines()]
    dev = synth.dev_answer_facts(facts, 0.15)
    assert dev == synth.dev_answer_facts(list(reversed(facts)), 0.15)  # not tied to the file order
    assert 0.12 <= len(dev) / len(facts) <= 0.18
    assert {f["category"] for f in facts if f["id"] in dev} == {f["category"] for f in facts}


def test_same_seed_gives_identical_files_and_another_seed_differs(corpus: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    _synth(again, workers=1)  # also shows the result does not depend on the number of workers
    for name in ("questions.jsonl", "answers.jsonl"):
        assert (again / name).read_bytes() == (corpus / name).read_bytes()
    assert _audio_bytes(again) == _audio_bytes(corpus)

    other = tmp_path / "other"
    _synth(other, seed=SEED + 1)
    assert (other / "questions.jsonl").read_bytes() != (corpus / "questions.jsonl").read_bytes()
    assert (other / "answers.jsonl").read_bytes() == (corpus / "answers.jsonl").read_bytes()  # fixed voice
    theirs, ours = _audio_bytes(other), _audio_bytes(corpus)
    assert sum(theirs[name] != ours[name] for name in ours) > len(ours) // 2


def test_resume_renders_only_missing_or_broken_files(corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)  # copy2 keeps the modification times
    wavs = sorted((copy / "audio").rglob("*.wav"))
    deleted, broken = wavs[0], wavs[1]
    original = deleted.read_bytes()
    deleted.unlink()
    broken.write_bytes(b"RIFF not really")
    before = {p: p.stat().st_mtime_ns for p in wavs[2:]}

    summary = _synth(copy)

    assert summary["rendered"] == 2
    assert deleted.read_bytes() == original and sf.info(str(broken)).samplerate == 16_000
    assert {p: p.stat().st_mtime_ns for p in wavs[2:]} == before
    assert (copy / "questions.jsonl").read_bytes() == (corpus / "questions.jsonl").read_bytes()


def test_cancel_between_batches_keeps_what_was_written(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cancelled"
    calls = []

    def cancel_on_second_batch() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise StageCancelled("stop")

    with pytest.raises(StageCancelled):
        synth.synthesize_corpus(FACTS, out, SEED, 1, 1, None, cancel_on_second_batch, limit=LIMIT)
    assert len(list((out / "audio").rglob("*.wav"))) == synth.BATCH_SIZE
    assert not (out / "questions.jsonl").exists()
    summary = _synth(out)
    assert summary["rendered"] == FILES - synth.BATCH_SIZE
    assert _audio_bytes(out) == _audio_bytes(corpus)


def test_cli_registers_data_synth(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    synth.register_cli(parser.add_subparsers())
    args = parser.parse_args(["data", "synth", "--facts", str(FACTS), "--out", str(tmp_path), "--limit", "2"])
    assert args.handler is synth.run_synth_cli and args.limit == 2 and args.renditions == synth.DEFAULT_RENDITIONS


def test_missing_fact_base_is_a_clear_error(tmp_path: Path) -> None:
    from echox.errors import EchoXError

    with pytest.raises(EchoXError, match=r"facts\.jsonl"):
        synth.synthesize_corpus(tmp_path / "nowhere", tmp_path / "out", seed=0, renditions=1, workers=1)
