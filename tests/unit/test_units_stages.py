"""Speech units and the unit language: features, k-means, the units.jsonl contract, the codec on
real units, the stages on a handful of espeak-ng answers, and the `echox units` commands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from echox.audio import SAMPLE_RATE, read_wav, write_wav
from echox.errors import ConfigError, EchoXError, ModelLoadError
from echox.espeak import speak
from echox.units.codec import UnitLanguageCodec, expand
from training.features import (
    FeatureConfig,
    LogMel,
    UnitExtractor,
    continuous_log_f0,
    feature_stats,
    fit_kmeans,
    pitch_track,
)
from training.stage import DONE_FILE, MetricsLog, StageContext, run_stage
from training.stages import unit_language, units

AGENT = {"voice": "en-us+f2", "rate": 150, "pitch": 50}
ANSWERS = [
    ("capital-0000", "train", "The capital of France is Paris."),
    ("capital-0001", "train", "The capital of Germany is Berlin."),
    ("add-0001", "train", "Two plus three is five."),
    ("color-0001", "train", "The sky is blue."),
    ("capital-0002", "dev", "The capital of Italy is Rome."),
    ("add-0002", "dev", "Four plus one is five."),
]
K = 12


def write_fake_synth(run_dir: Path) -> list[dict[str, Any]]:
    """A finished RUN/synth holding only agent answers, with the contract's manifests."""
    synth = run_dir / "synth"
    rows = []
    for fact_id, split, text in ANSWERS:
        audio = speak(text, AGENT["voice"], AGENT["rate"], AGENT["pitch"])
        path = f"audio/answers/a-{fact_id}.wav"
        write_wav(synth / path, audio)
        rows.append(
            {
                "id": f"a-{fact_id}",
                "fact_id": fact_id,
                "split": split,
                "voice": AGENT["voice"],
                "rate": AGENT["rate"],
                "pitch": AGENT["pitch"],
                "text": text,
                "path": path,
                "seconds": round(audio.size / SAMPLE_RATE, 3),
            }
        )
    (synth / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (synth / "questions.jsonl").write_text("")
    (synth / DONE_FILE).write_text("{}\n")
    return rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth (fake) → units (k=12) → unit_language, run once for the module."""
    folder = tmp_path_factory.mktemp("run")
    write_fake_synth(folder)
    torch.set_num_threads(1)
    run_stage(units.run, StageContext(run_dir=folder, stage="units", settings={"num_units": K}, seed=3))
    run_stage(unit_language.run, StageContext(run_dir=folder, stage="unit_language", settings={"vocab_size": 40}))
    return folder


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- features ------------------------------------------------------------------------------


def test_log_mel_gives_one_frame_per_hop() -> None:
    features = LogMel(FeatureConfig())
    assert features.config.frame_rate == 50.0
    assert features(np.zeros(16_000, dtype=np.float32)).shape == (50, 80)
    assert features(np.zeros(16_319, dtype=np.float32)).shape == (50, 80)  # a partial hop is dropped
    assert features(np.zeros(100, dtype=np.float32)).shape == (0, 80)


def test_frame_t_describes_hop_t() -> None:
    """A burst filling samples [t·hop, (t+1)·hop) is loudest in frame t: units line up with audio."""
    features = LogMel(FeatureConfig())
    for frame in (3, 10, 17):
        audio = np.zeros(20 * 320, dtype=np.float32)
        audio[frame * 320 : (frame + 1) * 320] = np.sin(np.arange(320) * 0.3).astype(np.float32)
        energy = features(audio).exp().sum(dim=1)
        assert int(energy.argmax()) == frame


def test_feature_config_rejects_misaligned_frames() -> None:
    with pytest.raises(ConfigError):
        FeatureConfig(n_fft=1023)  # n_fft - hop odd: frames could not be centred on their hop
    with pytest.raises(ConfigError):
        FeatureConfig(kind="hubert")


def test_kmeans_is_deterministic_for_a_seed() -> None:
    data = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    first, again = fit_kmeans(data, 5, seed=7), fit_kmeans(data, 5, seed=7)
    assert torch.equal(first, again)
    assert first.shape == (5, 6)
    with pytest.raises(ValueError):
        fit_kmeans(data[:3], 5, seed=7)


def test_extractor_assigns_the_nearest_centroid() -> None:
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    extractor = UnitExtractor(FeatureConfig(num_mels=2), torch.zeros(2), torch.ones(2), centroids)
    frames = torch.tensor([[9.0, 1.0], [1.0, 1.0], [0.0, 8.0], [0.4, -0.2]])
    assert extractor.assign(frames).tolist() == [1, 0, 2, 0]


def test_pitch_track_finds_the_fundamental_and_silence() -> None:
    seconds = np.arange(16_000) / 16_000
    tone = sum(np.sin(2 * np.pi * 180.0 * k * seconds) / k for k in range(1, 6)).astype(np.float32) * 0.2
    audio = np.concatenate([np.zeros(8_000, dtype=np.float32), tone])
    f0 = pitch_track(audio)
    assert f0.shape == (75,)
    assert np.all(f0[:20] == 0)  # silence is unvoiced
    assert np.allclose(f0[30:70], 180.0, rtol=0.01)
    filled = continuous_log_f0(np.array([0, 100, 0, 0, 400, 0], dtype=np.float32))
    assert np.allclose(np.exp(filled), [100, 100, 100 * 4 ** (1 / 3), 100 * 4 ** (2 / 3), 400, 400], rtol=1e-4)


# --- the units stage -----------------------------------------------------------------------


def test_units_jsonl_follows_the_contract(run_dir: Path) -> None:
    rows = _rows(run_dir / "units" / "units.jsonl")
    answers = _rows(run_dir / "synth" / "answers.jsonl")
    assert [r["id"] for r in rows] == [a["id"] for a in answers]
    for row, answer in zip(rows, answers, strict=True):
        assert set(row) == {"id", "fact_id", "split", "units", "durations"}
        assert (row["fact_id"], row["split"]) == (answer["fact_id"], answer["split"])
        assert len(row["units"]) == len(row["durations"]) > 0
        assert all(a != b for a, b in zip(row["units"], row["units"][1:], strict=False))  # deduplicated
        assert all(0 <= u < K for u in row["units"]) and min(row["durations"]) >= 1
        samples = read_wav(run_dir / "synth" / answer["path"]).size
        assert sum(row["durations"]) == samples // 320  # 50 Hz: one unit frame per vocoder hop
    summary = json.loads((run_dir / "units" / DONE_FILE).read_text())
    assert summary["num_units"] == K and summary["answers"] == len(ANSWERS)


def test_answers_with_units_joins_by_id_and_names_a_stale_side(run_dir: Path, tmp_path: Path) -> None:
    pairs = units.answers_with_units(run_dir / "synth", run_dir / "units", "test")
    answer_ids = [a["id"] for a in _rows(run_dir / "synth" / "answers.jsonl")]
    assert [(a["id"], u["id"]) for a, u in pairs] == list(zip(answer_ids, answer_ids, strict=True))
    rows = _rows(run_dir / "units" / "units.jsonl")
    for kept, problem in (
        (rows[1:], f"has no units for the answers \\[{rows[0]['id']}\\]"),
        ([*rows, {**rows[0], "id": "zz9"}], r"names answers that synth's answers.jsonl lacks: \[zz9\]"),
    ):
        stale = tmp_path / "units"
        stale.mkdir(exist_ok=True)
        (stale / "units.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        with pytest.raises(EchoXError, match=f"^test: units.jsonl {problem}"):
            units.answers_with_units(run_dir / "synth", stale, "test")


def test_saved_extractor_reproduces_the_stage_units(run_dir: Path) -> None:
    """Dedup consistency: expand(units, durations) is exactly what the saved k-means gives per frame."""
    extractor = UnitExtractor.load(run_dir / "units")
    assert extractor.num_units == K
    assert json.loads((run_dir / "units" / "units.json").read_text())["features"]["hop_length"] == 320
    for row, answer in zip(
        _rows(run_dir / "units" / "units.jsonl"), _rows(run_dir / "synth" / "answers.jsonl"), strict=True
    ):
        audio = read_wav(run_dir / "synth" / answer["path"])
        assert expand(row["units"], row["durations"]) == extractor.frame_units(audio)
        assert extractor.dedup_units(audio) == row["units"]


def test_extractor_load_explains_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no unit model"):
        UnitExtractor.load(tmp_path)


def test_units_settings_reject_unknown_keys() -> None:
    with pytest.raises(EchoXError, match="unknown keys"):
        units.UnitsSettings.from_mapping({"k": 10})


def test_feature_stats_floor_a_constant_dimension() -> None:
    mean, std = feature_stats(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    assert mean.tolist() == [2.0, 5.0] and std[0] == 1.0 and std[1] > 0


# --- the unit language ---------------------------------------------------------------------


def test_codec_round_trips_real_units(run_dir: Path) -> None:
    codec = UnitLanguageCodec.load(run_dir / "unit_language" / "unit_language.json")
    assert codec.num_units == K and K < codec.vocab_size <= 40
    for row in _rows(run_dir / "units" / "units.jsonl"):
        tokens = codec.encode(row["units"])
        assert codec.decode(tokens) == row["units"]
        assert len(tokens) <= len(row["units"])


def test_unit_language_reports_held_out_compression(run_dir: Path) -> None:
    summary = json.loads((run_dir / "unit_language" / DONE_FILE).read_text())
    dev = [r["units"] for r in _rows(run_dir / "units" / "units.jsonl") if r["split"] == "dev"]
    assert summary["dev_answers"] == len(dev) == 2
    codec = UnitLanguageCodec.load(run_dir / "unit_language" / "unit_language.json")
    assert math.isclose(summary["dev_compression"], codec.compression_ratio(dev), rel_tol=1e-3)
    assert summary["dev_compression"] > 1.0  # shared phrases ("The capital of", "plus") merge
    assert MetricsLog(run_dir / "unit_language").data["dev_compression"] == summary["dev_compression"]


def test_unit_language_refuses_a_vocab_below_the_unit_count() -> None:
    rows = [{"split": "train", "units": [0, 1, 2]}]
    with pytest.raises(EchoXError, match="smaller than"):
        unit_language.train_unit_language(rows, num_units=8, vocab_size=4)


# --- the CLI -------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    units.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


def test_cli_extract_matches_the_stage(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "extracted.jsonl"
    assert (
        _cli(
            [
                "units",
                "extract",
                "--corpus",
                str(run_dir / "synth"),
                "--model",
                str(run_dir / "units"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert _rows(out) == _rows(run_dir / "units" / "units.jsonl")


def test_cli_train_language_writes_a_codec_and_prints_compression(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "units",
        "train-language",
        "--units",
        str(run_dir / "units" / "units.jsonl"),
        "--vocab",
        "30",
        "--out",
        str(tmp_path),
    ]
    assert _cli(argv) == 0
    codec = UnitLanguageCodec.load(tmp_path / "unit_language.json")
    assert codec.num_units == K and codec.vocab_size <= 30
    assert "compression on held-out (dev) answers" in capsys.readouterr().out


def test_compression_summary_names_the_held_out_ratio_or_its_absence() -> None:
    held_out = unit_language.compression_summary({"train_compression": 2.5, "dev_compression": 2.3715})
    assert held_out == "compression on held-out (dev) answers: 2.372 units per token"
    none_held_out = unit_language.compression_summary({"train_compression": 2.5352, "dev_compression": None})
    assert "no held-out compression ratio" in none_held_out and "train answers: 2.535" in none_held_out
