"""Units from a layer of the run's own speech encoder (`units: {features: {kind: encoder}}`): the
states read, one per hop, the units folder that carries its encoder, and the units stage reading
the asr stage's encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from echox.audio import read_wav, write_wav
from echox.checkpoint import save_part
from echox.errors import ConfigError
from echox.espeak import speak
from echox.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from echox.units.codec import dedup
from training.features import ENCODER_PART, EncoderStates, FeatureConfig, UnitExtractor, build_features
from training.stage import DONE_FILE, StageContext, run_stage
from training.stages import units

HOP = 320
WINDOW = 60  # states: a 1.2 s window, so a few seconds of speech take several windows
ENCODER = SpeechEncoderConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, num_mel_bins=80,
                              max_source_positions=WINDOW)
ENCODER_FEATURES: dict[str, Any] = {"kind": "encoder", "encoder_layers": 1}


def micro_encoder(seed: int = 0) -> SpeechEncoder:
    torch.manual_seed(seed)
    return SpeechEncoder(ENCODER).eval()


def noise(samples: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, samples).astype(np.float32)


def test_encoder_states_are_the_layer_states_of_the_hf_forward() -> None:
    """State t is the HF encoder's hidden state t after `encoder_layers` layers, on the audio read
    from half a hop on. A 20-hop clip is read in a 45-state window (20 + 25 of margin): the HF
    forward of the same weights with a 45-state window is the reference."""
    encoder, frames = micro_encoder(), 20
    audio = noise(frames * HOP + 100)
    ours = EncoderStates(FeatureConfig(**ENCODER_FEATURES), encoder)(audio)
    last = EncoderStates(FeatureConfig(kind="encoder", encoder_layers=0), encoder)(audio)
    cropped = SpeechEncoder(ENCODER.replace(max_source_positions=frames + 25)).eval()
    weights = encoder.state_dict()
    weights["whisper.embed_positions.weight"] = weights["whisper.embed_positions.weight"][: frames + 25]
    cropped.load_state_dict(weights)
    with torch.no_grad():
        hidden = cropped.whisper(cropped.log_mel(audio[HOP // 2 : frames * HOP]), output_hidden_states=True)
    assert ours.shape == (frames, ENCODER.d_model)
    assert torch.allclose(ours, hidden.hidden_states[1][0, :frames], atol=1e-5)
    assert torch.allclose(last, hidden.last_hidden_state[0, :frames], atol=1e-5)  # 0 = all, final norm


@pytest.mark.parametrize("samples", [0, 100, HOP, 34 * HOP, 35 * HOP + 7, 150 * HOP + 300])
def test_encoder_states_give_one_state_per_hop_across_windows(samples: int) -> None:
    states = EncoderStates(FeatureConfig(**ENCODER_FEATURES), micro_encoder())(noise(samples))
    assert states.shape == (samples // HOP, ENCODER.d_model)
    assert torch.isfinite(states).all()
    if samples > 3 * WINDOW * HOP // 2:  # every window's states are read, none left as padding
        assert (states.abs().sum(1) > 0).all()


def test_encoder_features_need_the_encoder_and_its_frame_rate() -> None:
    with pytest.raises(ConfigError, match="asr"):
        build_features(FeatureConfig(kind="encoder"))
    with pytest.raises(ConfigError, match="hop_length must be 320"):
        FeatureConfig(kind="encoder", hop_length=160, win_length=400, n_fft=400)
    with pytest.raises(ConfigError, match="sample_rate must be 16000"):  # hop x rate as 320 x 16 kHz, not Whisper's
        FeatureConfig(kind="encoder", sample_rate=32_000, hop_length=160, win_length=640, n_fft=1024, f_max=16_000)
    with pytest.raises(ConfigError, match="encoder_layers 3"):
        EncoderStates(FeatureConfig(kind="encoder", encoder_layers=3), micro_encoder())
    with pytest.raises(ConfigError, match="kind"):
        FeatureConfig(kind="hubert")


def write_answers(run_dir: Path) -> list[np.ndarray]:
    """A finished RUN/synth with four espeak-ng agent answers (three train, one dev)."""
    synth, rows, audios = run_dir / "synth", [], []
    texts = ["The sky is blue.", "Two plus three is five.", "The capital of France is Paris.", "Grass is green."]
    for index, text in enumerate(texts):
        audio = speak(text, "en-us+f2", 150, 50)
        write_wav(synth / f"a{index}.wav", audio)
        split = "dev" if index == len(texts) - 1 else "train"
        rows.append({"id": f"a{index}", "fact_id": f"f{index}", "split": split, "text": text, "path": f"a{index}.wav"})
        audios.append(audio)
    (synth / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (synth / DONE_FILE).write_text("{}\n")
    return audios


def test_units_stage_reads_the_asr_encoder_and_its_folder_carries_it(tmp_path: Path) -> None:
    audios = write_answers(tmp_path)
    settings = {"num_units": 6, "features": ENCODER_FEATURES}
    with pytest.raises(FileNotFoundError, match="needs stage 'asr'"):
        run_stage(units.run, StageContext(run_dir=tmp_path, stage="units", settings=settings, seed=3))
    encoder = micro_encoder(seed=5)
    save_part(tmp_path / "asr", ENCODER_PART, encoder, ENCODER)
    (tmp_path / "asr" / DONE_FILE).write_text("{}\n")
    run_stage(units.run, StageContext(run_dir=tmp_path, stage="units", settings=settings, seed=3))

    folder = tmp_path / "units"
    assert json.loads((folder / "units.json").read_text())["features"]["kind"] == "encoder"
    assert (folder / f"{ENCODER_PART}.safetensors").is_file()
    (tmp_path / "asr" / f"{ENCODER_PART}.safetensors").unlink()  # the units folder alone extracts units
    loaded = UnitExtractor.load(folder)
    rows = [json.loads(line) for line in (folder / "units.jsonl").read_text().splitlines()]
    for index, (row, audio) in enumerate(zip(rows, audios, strict=True)):
        units_of_audio, durations = dedup(loaded.frame_units(read_wav(tmp_path / "synth" / f"a{index}.wav")))
        assert (list(units_of_audio), list(durations)) == (row["units"], row["durations"])
        assert sum(row["durations"]) == audio.size // HOP
    assert len({u for row in rows for u in row["units"]}) > 2  # the answers' sounds fall in several clusters
    expected = EncoderStates(FeatureConfig(**ENCODER_FEATURES), encoder)(audios[0])
    assert loaded.encoder is not None
    assert torch.allclose(build_features(loaded.config, loaded.encoder)(audios[0]), expected)
