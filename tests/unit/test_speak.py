"""Assembling a model from stage parts, and `echox speak` (text → echo decoder → vocoder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

import echox.cli.main as cli_main
from echox.checkpoint import EchoX, load_part_weights, save_part
from echox.errors import ModelLoadError
from echox.models.echo_decoder import EchoDecoder
from echox.models.istft_vocoder import IstftVocoder, IstftVocoderConfig
from echox.models.llm import build_llm
from echox.models.presets import preset_tiny
from echox.models.vocoder import VocoderConfig
from echox.models.vocoders import AnyVocoderConfig, build_vocoder
from echox.tokenizer import byte_level_tokenizer
from echox.units.codec import UnitLanguageCodec
from training import speak
from training.assemble import assemble_model
from training.stage import DONE_FILE

NUM_UNITS = 20


def make_parts(run: Path, vocoder: AnyVocoderConfig | None = None) -> None:
    """Stand-in finished stages lm, t2c, unit_language and vocoder (random weights; a small
    HiFi-GAN vocoder unless `vocoder` says otherwise)."""
    tokenizer = byte_level_tokenizer()
    codec = UnitLanguageCodec.train([[1, 2, 3, 1, 2, 3, 4, 5] * 3, [4, 5, 6, 7, 1, 2]], NUM_UNITS, NUM_UNITS + 6)
    config = preset_tiny(tokenizer.vocab_size, codec.vocab_size, NUM_UNITS)
    config = config.replace(
        llm=config.llm.replace(num_layers=1),
        echo_decoder=config.echo_decoder.replace(num_layers=1, max_units_per_input=2.0, min_units=4),
        vocoder=vocoder or VocoderConfig.tiny().replace(num_units=NUM_UNITS, upsample_initial_channel=32),
    )
    torch.manual_seed(0)
    decoder = EchoDecoder(config.echo_decoder)
    with torch.no_grad():
        decoder.lm_head.weight[tokenizer.eos_id] = 0.0  # never stop early: every segment speaks
    def write_lm(folder: Path) -> None:
        tokenizer.save(folder / "tokenizer.json")
        save_part(folder, "llm", build_llm(config.llm), config.llm)

    parts: dict[str, Callable[[Path], Any]] = {
        "lm": write_lm,
        "t2c": lambda d: save_part(d, "echo_decoder", decoder, config.echo_decoder),
        "unit_language": lambda d: codec.save(d / "unit_language.json"),
        "vocoder": lambda d: save_part(d, "vocoder", build_vocoder(config.vocoder), config.vocoder),
    }
    for stage, write in parts.items():
        (run / stage).mkdir(parents=True)
        write(run / stage)
        (run / stage / DONE_FILE).write_text("{}\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    make_parts(run)
    return run


@pytest.fixture(scope="module")
def model_dir(run_dir: Path) -> Path:
    return assemble_model(run_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> EchoX:
    return EchoX.from_pretrained(model_dir)


def test_assembled_model_carries_the_parts(run_dir: Path, model_dir: Path, model: EchoX) -> None:
    assert model_dir == run_dir / "model"
    assert model.codec.vocab_size == model.config.echo_decoder.unit_vocab_size == NUM_UNITS + 6
    vocoder = model.config.vocoder
    assert isinstance(vocoder, VocoderConfig) and vocoder.upsample_initial_channel == 32  # from vocoder.json
    assert model.config.encoder == preset_tiny().encoder
    decoder = EchoDecoder(model.config.echo_decoder)
    load_part_weights(run_dir / "t2c", "echo_decoder", decoder)
    torch.testing.assert_close(model.model.echo_decoder.lm_head.weight, decoder.lm_head.weight)


def test_assemble_needs_finished_parts(tmp_path: Path) -> None:
    make_parts(tmp_path)
    (tmp_path / "vocoder" / DONE_FILE).unlink()
    with pytest.raises(ModelLoadError, match="'vocoder' has not finished"):
        assemble_model(tmp_path)


def test_speak_text_is_16k_float_in_whole_hops(model: EchoX) -> None:
    audio = speak.speak_text(model, "The capital of France is Paris.")
    hop = model.config.vocoder.hop_length
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size > 0 and audio.size % hop == 0
    assert model.config.vocoder.sample_rate == 16_000


def test_long_text_is_spoken_sentence_by_sentence(model: EchoX, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = speak.segment_units

    def spy(echox: EchoX, text: str) -> list[int]:
        seen.append(text)
        return real(echox, text)

    monkeypatch.setattr(speak, "segment_units", spy)
    audio = speak.speak_text(model, "Bees make honey. They fly!  Do they sting?")
    assert seen == ["Bees make honey.", "They fly!", "Do they sting?"]
    monkeypatch.undo()
    pieces = [speak.speak_text(model, text) for text in seen]
    assert audio.size == sum(p.size for p in pieces)


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`echox ARGV` with `speak` registered the way the training entry point will register it."""

    class Entry:
        def load(self) -> Callable[[Any], None]:
            return speak.register_cli

    monkeypatch.setattr(cli_main, "entry_points", lambda group: [Entry()])
    return cli_main.main(argv)


def test_cli_writes_a_wav(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "said.wav"
    assert run_cli(["speak", "Two plus two is four.", "--model", str(model_dir), "--out", str(out)], monkeypatch) == 0
    info = sf.info(str(out))
    assert info.samplerate == 16_000 and info.channels == 1 and info.frames > 0


@pytest.mark.parametrize(
    ("text", "model", "message"),
    [("   ", "MODEL", "nothing to speak"), ("Hello.", "MISSING", "no model folder")],
)
def test_cli_errors_are_one_line(
    text: str, model: str, message: str, model_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    folder = model_dir if model == "MODEL" else tmp_path / "missing"
    code = run_cli(["speak", text, "--model", str(folder), "--out", str(tmp_path / "x.wav")], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("echox: error:") and message in err
    assert not (tmp_path / "x.wav").exists()


def test_assembled_model_takes_the_istft_vocoder_the_recipe_trains(tmp_path: Path) -> None:
    small = IstftVocoderConfig(num_units=NUM_UNITS, hidden_dim=32, intermediate_dim=64, num_layers=1)
    make_parts(tmp_path, vocoder=small)
    model = EchoX.from_pretrained(assemble_model(tmp_path))
    assert isinstance(model.model.vocoder, IstftVocoder) and model.config.vocoder == small
    audio = speak.speak_text(model, "Hello there.")
    assert audio.dtype == np.float32 and audio.size % small.hop_length == 0


def test_model_stage_assembles_the_run_into_run_model(tmp_path: Path) -> None:
    from training.stage import StageContext, run_stage
    from training.stages import stage_fn

    make_parts(tmp_path)
    result = run_stage(stage_fn("model"), StageContext(run_dir=tmp_path, stage="model", settings={}))
    assert result["folder"] == str(tmp_path / "model") and result["megabytes"] > 0
    assert EchoX.from_pretrained(tmp_path / "model").codec.num_units == NUM_UNITS


def test_model_stage_stores_float16_weights_and_refuses_unknown_settings(tmp_path: Path) -> None:
    from safetensors import safe_open

    from echox.errors import ConfigError
    from training.stage import StageContext, run_stage
    from training.stages import stage_fn

    def model_stage(settings: dict[str, Any]) -> dict[str, Any]:
        return run_stage(stage_fn("model"), StageContext(run_dir=tmp_path, stage="model", settings=settings))

    make_parts(tmp_path)
    with pytest.raises(ConfigError, match="weights_dtype"):
        model_stage({"weights_dtype": "int3"})
    assert model_stage({"weights_dtype": "float16"})["weights_dtype"] == "float16"
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as stored:
        names = stored.keys()  # a safe_open handle is not iterable
        dtypes = {stored.get_slice(name).get_dtype() for name in names}
    assert "F16" in dtypes
    loaded = EchoX.from_pretrained(tmp_path / "model")
    assert loaded.model.input_table().dtype == torch.float32
