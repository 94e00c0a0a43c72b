"""The `echox` command line: JSON shapes, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echox.audio import write_wav
from echox.cli.main import main


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("q") / "question.wav"
    t = np.arange(24_000) / 24_000
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 24_000)  # resampled
    return path


def test_respond_json(
    micro_model_dir: Path, question_wav: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "answer.wav"
    assert main(["respond", str(question_wav), "--model", str(micro_model_dir), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"transcript", "text", "segments", "first_segment_tokens", "timings_ms", "audio_seconds"}
    assert set(result["timings_ms"]) == {"first_text", "first_audio", "total"}
    for segment in result["segments"]:
        assert set(segment) == {"index", "tokens", "text", "audio_seconds"}
    info = sf.info(str(out))
    assert info.samplerate == 16_000 and info.channels == 1
    assert abs(info.duration - result["audio_seconds"]) < 1e-3


def test_model_info_json_for_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", "--preset", "3b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["llm_b"] - 3.21) / 3.21 < 0.03
    assert abs(report["speech_encoder_b"] - 0.64) / 0.64 < 0.03


def test_model_init_and_info_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "init", "--preset", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    assert main(["model", "info", str(tmp_path / "tiny"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["parameters"]["total"] > 1_000_000


def _echox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "echox.cli.main", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("make_input", "reason"),
    [
        (lambda d: d / "missing.wav", "no audio file"),
        (lambda d: (d / "empty.wav", write_wav(d / "empty.wav", np.zeros(0, np.float32)))[0], "empty"),
        (lambda d: (d / "bad.wav", (d / "bad.wav").write_bytes(b"junk"))[0], "cannot read"),
        (lambda d: (d / "long.wav", write_wav(d / "long.wav", np.zeros(16_000 * 12, np.float32)))[0], "window"),
    ],
    ids=["missing", "empty", "corrupt", "too-long"],
)
def test_respond_bad_input_exits_nonzero_with_one_line(
    micro_model_dir: Path, tmp_path: Path, make_input, reason: str  # type: ignore[no-untyped-def]
) -> None:
    path = make_input(tmp_path)
    proc = _echox("respond", str(path), "--model", str(micro_model_dir), "--out", str(tmp_path / "o.wav"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_respond_with_a_missing_model_folder(question_wav: Path, tmp_path: Path) -> None:
    proc = _echox("respond", str(question_wav), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o.wav"))
    assert proc.returncode == 2 and "no model folder" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_the_subcommands() -> None:
    proc = _echox("--help")
    assert proc.returncode == 0
    for command in ("model", "respond", "bench", "demo"):
        assert command in proc.stdout


def _demo_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_demo_speaks_a_dev_voice_question_and_prints_what_it_heard_said_and_took(
    micro_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo" / "answer.wav"
    assert main(["demo", "--model", str(micro_model_dir), "--out", str(out)]) == 0
    lines = _demo_lines(capsys)
    question = tmp_path / "demo" / "demo-question.wav"
    assert lines[0] == f"model: {micro_model_dir}"
    assert lines[1] == f"question (en-us+m5): 'What is the capital of France?' → {question}"
    assert lines[2].startswith("heard:  ") and lines[3].startswith("answer: ")
    assert lines[4].startswith("timings: first text ") and lines[4].endswith(f"of speech → {out}")
    assert lines[5].startswith("real-time factor: ")
    for wav in (question, out):
        info = sf.info(str(wav))
        assert info.samplerate == 16_000 and info.channels == 1
    assert sf.info(str(question)).duration > 1.0  # espeak-ng spoke the whole question


def test_demo_answers_a_given_recording(
    micro_model_dir: Path, question_wav: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "answer.wav"
    assert main(["demo", "--model", str(micro_model_dir), "--question", str(question_wav), "--out", str(out)]) == 0
    lines = _demo_lines(capsys)
    assert lines[1] == f"question: {question_wav}" and out.is_file()
    assert not (tmp_path / "demo-question.wav").exists()


def test_demo_without_a_default_model_runs_a_random_init_one_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import echox.models.presets
    from echox.cli import demo_cmd
    from tests.unit.conftest import micro_config

    monkeypatch.setattr(demo_cmd, "default_model_dir", lambda: None)
    monkeypatch.setattr(echox.models.presets, "preset_tiny", micro_config)  # the tiny preset, shrunk for speed
    assert main(["demo", "--out", str(tmp_path / "answer.wav")]) == 0
    lines = _demo_lines(capsys)
    assert lines[0] == demo_cmd.RANDOM_MODEL_NOTE and (tmp_path / "answer.wav").is_file()
