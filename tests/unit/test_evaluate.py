"""`echox eval` of the speaking half: the answers it loads, the renderings it judges, the shares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from echox.audio import write_wav
from echox.checkpoint import EchoX
from echox.errors import EchoXError
from tests.unit.test_speak import make_parts
from training.assemble import assemble_model
from training.evaluate import SPEAKING_VERSIONS, load_answers, speaking_report, swapped_texts

FACTS = {"f1": {"id": "f1", "key": ["Paris"]}, "f2": {"id": "f2", "key": ["seven"]}}


def make_corpus(run: Path) -> None:
    """Two dev answers and one train answer, with recordings and units."""
    rows = [
        ("a1", "f1", "dev", "It is Paris."),
        ("a2", "f2", "dev", "Seven. It has seven."),
        ("a3", "f1", "train", "Paris."),
    ]
    (run / "synth" / "audio").mkdir(parents=True)
    (run / "units").mkdir()
    answers, units = [], []
    for index, (answer_id, fact_id, split, text) in enumerate(rows):
        path = f"audio/{answer_id}.wav"
        tone = np.sin(np.arange(8000 + 1000 * index) * 0.05).astype(np.float32) * 0.3
        write_wav(run / "synth" / path, tone)
        answers.append({"id": answer_id, "fact_id": fact_id, "split": split, "text": text, "path": path})
        units.append({"id": answer_id, "fact_id": fact_id, "split": split, "units": [1, 5, 2], "durations": [3, 4, 2]})
    (run / "synth" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    (run / "units" / "units.jsonl").write_text("".join(json.dumps(r) + "\n" for r in units))


class RecordingJudge:
    """Stands in for Whisper: hears `words` in the recordings it was given, nothing elsewhere."""

    def __init__(self, recordings: dict[int, str]) -> None:
        self.recordings = recordings  # audio length → transcript
        self.heard: list[int] = []

    def transcribe(self, audio: npt.NDArray[np.float32]) -> str:
        self.heard.append(audio.size)
        return self.recordings.get(audio.size, "something else")


@pytest.fixture(scope="module")
def run_with_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EchoX]:
    run = tmp_path_factory.mktemp("run")
    make_parts(run)
    make_corpus(run)
    return run, EchoX.from_pretrained(assemble_model(run))


def test_load_answers_joins_recordings_keys_and_units(run_with_model: tuple[Path, EchoX]) -> None:
    run, _ = run_with_model
    answers = load_answers(run, "dev", FACTS)
    assert [a.id for a in answers] == ["a1", "a2"]
    assert answers[1].keys == ("seven",) and answers[1].units == (1, 5, 2) and answers[1].durations == (3, 4, 2)
    assert answers[0].recording.is_file()
    with pytest.raises(EchoXError, match="no 'test' answers"):
        load_answers(run, "test", FACTS)


def test_load_answers_refuses_an_answer_without_units(tmp_path: Path) -> None:
    make_corpus(tmp_path)
    (tmp_path / "units" / "units.jsonl").write_text("")
    with pytest.raises(EchoXError, match="has no units"):
        load_answers(tmp_path, "dev", FACTS)


def test_speaking_report_judges_four_renderings_and_compares_with_the_original(
    run_with_model: tuple[Path, EchoX], tmp_path: Path
) -> None:
    run, echox = run_with_model
    answers = load_answers(run, "dev", FACTS)
    judge = RecordingJudge({8000: "it is paris", 9000: "seven it has 7"})  # the two dev recordings
    report = speaking_report(echox, answers, judge, samples_dir=tmp_path)
    assert len(judge.heard) == 4 * len(answers)
    assert report["shares"] == {"original": 1.0, "resynth": 0.0, "resynth_true_durations": 0.0, "speak": 0.0}
    assert report["vs_original"]["original"] == 1.0 and report["vs_original"]["speak"] == 0.0
    assert [m["id"] for m in report["misses"]["speak"]] == ["a1", "a2"] and not report["misses"]["original"]
    hop = echox.config.vocoder.hop_length
    assert 9 * hop in judge.heard  # the resynthesis with the recorded durations: 3 + 4 + 2 frames
    written = sorted(p.name for p in tmp_path.glob("*.wav"))
    assert len(written) == 2 * (len(SPEAKING_VERSIONS) - 1)


CATEGORIZED = [
    {"id": "f1", "category": "capital", "key": ["Paris"]},
    {"id": "f2", "category": "count", "key": ["seven"]},
    {"id": "f3", "category": "capital", "key": ["Rome"]},
    {"id": "f4", "category": "capital", "key": ["Oslo"]},
]


def test_swapped_texts_put_another_facts_key_words_in_and_skip_what_the_t2c_trained_on(
    run_with_model: tuple[Path, EchoX], tmp_path: Path
) -> None:
    run, _ = run_with_model
    answers = load_answers(run, "dev", FACTS)
    swapped = swapped_texts(run, answers, CATEGORIZED, per_answer=3, seed=0)
    # a1 ("It is Paris.") takes each other capital; a2's category has no other fact
    assert sorted((s.text, s.keys, s.answer_id) for s in swapped) == [
        ("It is Oslo.", ("Oslo",), "a1"),
        ("It is Rome.", ("Rome",), "a1"),
    ]
    assert swapped_texts(run, answers, CATEGORIZED, per_answer=1, seed=0)[0].text in {"It is Oslo.", "It is Rome."}
    trained = tmp_path / "run"
    shutil.copytree(run, trained)
    (trained / "t2c").mkdir(exist_ok=True)
    (trained / "t2c" / "pieces.jsonl").write_text(json.dumps({"text": "It is Rome.", "units": [1]}) + "\n")
    assert [s.text for s in swapped_texts(trained, answers, CATEGORIZED, per_answer=3, seed=0)] == ["It is Oslo."]


def test_speaking_report_judges_speak_of_the_swapped_texts_alone_and_pooled(
    run_with_model: tuple[Path, EchoX],
) -> None:
    run, echox = run_with_model
    answers = load_answers(run, "dev", FACTS)
    swapped = swapped_texts(run, answers, CATEGORIZED, per_answer=3, seed=0)

    class HearsRome:  # every rendering sounds like "rome" to it: only the Rome text is heard
        def transcribe(self, audio: npt.NDArray[np.float32]) -> str:
            return "it is rome"

    report = speaking_report(echox, answers, HearsRome(), swapped=swapped)
    assert report["shares"]["speak"] == 0.0
    assert report["swapped"]["texts"] == 2 and report["swapped"]["speak"] == 0.5
    assert report["swapped"]["speak_pooled"] == 1 / 4
    assert [m["text"] for m in report["swapped"]["misses"]] == ["It is Oslo."]
    assert "swapped" not in speaking_report(echox, answers, HearsRome())
