"""The committed default model (echox/assets/echox-tiny) answers spoken dev-voice questions.

`echox respond` itself runs here, in a subprocess, on questions espeak-ng speaks in the dev
voices (voices the model never heard in training). The answer TEXT must hold the fact's key
words; the spoken answer is judged by `echox eval`, not here. Three questions are a regression
check, not a measurement: the model's accuracy over the dev voices is `echox eval`'s figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from echox.audio import read_wav, write_wav
from echox.espeak import speak
from echox.paths import DEFAULT_MODEL_DIR
from training.judge import Judge, has_key_words

ECHOX = str(Path(sys.executable).with_name("echox"))  # the console script of this environment

# (question, dev voice, key words): three categories, both dev voices.
QUESTIONS = [
    ("What is the capital of France?", "en-us+m5", ("Paris",)),
    ("What is the capital of Sweden?", "en+f5", ("Stockholm",)),
    ("What is two plus three?", "en-us+m5", ("five",)),
]


def test_the_default_model_is_committed_and_small() -> None:
    assert (DEFAULT_MODEL_DIR / "config.json").is_file(), f"no default model at {DEFAULT_MODEL_DIR}"
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024, f"the default model is {size / 2**20:.1f} MB (limit 25 MB)"


@pytest.mark.parametrize(("question", "voice", "key"), QUESTIONS)
def test_respond_answers_a_dev_voice_question(tmp_path: Path, question: str, voice: str, key: tuple[str, ...]) -> None:
    wav = tmp_path / "question.wav"
    write_wav(wav, speak(question, voice=voice))
    done = subprocess.run(
        [ECHOX, "respond", str(wav), "--out", str(tmp_path / "answer.wav"), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert has_key_words(result["text"], key), f"heard {result['transcript']!r}, answered {result['text']!r}"
    assert result["audio_seconds"] > 0.5


def test_the_demo_answer_is_heard_correctly_by_the_judge(tmp_path: Path) -> None:
    """What `make demo` runs: the default question in a dev voice; the judge (Whisper tiny.en,
    which the project did not train) must hear the key word in the answer WAV."""
    out = tmp_path / "demo-answer.wav"
    done = subprocess.run([ECHOX, "demo", "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "answer: " in done.stdout and "first audio" in done.stdout
    heard = Judge().transcribe(read_wav(out))
    assert has_key_words(heard, ("Paris",)), f"the judge heard {heard!r}"
