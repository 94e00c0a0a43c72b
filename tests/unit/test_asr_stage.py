"""Stage asr: batch layout, the cropped-window encoder, error rates, a smoke run and resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from echox.audio import SAMPLE_RATE, write_wav
from echox.checkpoint import load_part_weights, read_part_config
from echox.errors import ConfigError
from echox.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from echox.tokenizer import byte_level_tokenizer
from training.stage import DONE_FILE, METRICS_FILE, StageCancelled, StageContext, run_stage
from training.stages import asr

MICRO_ENCODER: dict[str, Any] = {
    "d_model": 32,
    "num_layers": 1,
    "num_heads": 2,
    "ffn_dim": 64,
    "num_mel_bins": 80,
    "max_source_positions": 100,  # a 2 s window
}
SMOKE: dict[str, Any] = {
    "steps": 4,
    "max_minutes": 0,
    "batch_size": 3,
    "warmup": 1,
    "decoder_layers": 1,
    "max_target_positions": 64,
    "threads": 1,
    "checkpoint_every": 2,
    "log_every": 1,
    "dev_clips": 2,
    "eval_batch_size": 2,
    "window_margin_s": 1.0,  # some batches reach the whole window, some stay cropped
    "augment": {"noise_prob": 1.0, "speed_prob": 1.0},
    "freq_masks": 1,  # SpecAugment on too
    "time_masks": 1,
    "encoder_overrides": MICRO_ENCODER,
}
TEXTS = [
    ("q-0", "train", "question", "Who is it?"),
    ("q-1", "train", "question", "What is red?"),
    ("q-2", "train", "question", "Name a sea."),
    ("q-3", "train", "question", "Why not?"),
    ("a-0", "train", "answer", "It is blue."),
    ("q-4", "dev", "question", "Who is red?"),
    ("q-5", "dev", "question", "Name it."),
]


def chirp(seed: int, seconds: float) -> np.ndarray:
    """A distinct, speech-loud stand-in recording per clip."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    base = rng.uniform(120, 300)
    return (0.3 * np.sin(2 * np.pi * (base + 200 * t) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def make_run(run: Path) -> None:
    """A finished synth (questions + answers manifests, chirps) and lm (byte-level tokenizer)."""
    for stage in ("synth", "lm"):
        (run / stage).mkdir(parents=True)
    manifests: dict[str, list[str]] = {"question": [], "answer": []}
    for seed, (clip_id, split, kind, text) in enumerate(TEXTS):
        audio = chirp(seed, 0.8 + 0.1 * seed)
        path = f"audio/{clip_id}.wav"
        write_wav(run / "synth" / path, audio)
        row = {"id": clip_id, "split": split, "text": text, "path": path, "seconds": audio.size / SAMPLE_RATE}
        manifests[kind].append(json.dumps(row) + "\n")
    for kind, lines in manifests.items():
        (run / "synth" / asr.MANIFESTS[kind]).write_text("".join(lines))
    byte_level_tokenizer().save(run / "lm" / "tokenizer.json")
    for stage in ("synth", "lm"):
        (run / stage / DONE_FILE).write_text("{}\n")


class CancelAfter:
    """A reporter that cancels the stage after `steps` training steps."""

    def __init__(self, cancel: threading.Event, steps: int) -> None:
        self.cancel, self.left = cancel, steps

    def start(self, stage: str, total: int, unit: str = "steps") -> None:
        pass

    def advance(self, steps: int = 1, **metrics: float) -> None:
        if metrics:  # the resume catch-up advance carries no metrics
            self.left -= steps
            if self.left <= 0:
                self.cancel.set()

    def log(self, message: str) -> None:
        pass


def context(run: Path, cancel_after: int | None = None) -> StageContext:
    ctx = StageContext(run_dir=run, stage="asr", settings=SMOKE, seed=5)
    if cancel_after is not None:
        ctx.reporter = CancelAfter(ctx.cancel, cancel_after)
    return ctx


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run = tmp_path_factory.mktemp("run")
    make_run(run)
    return run, run_stage(asr.run, context(run))


def test_smoke_run_writes_a_loadable_speech_encoder(finished_run: tuple[Path, dict[str, Any]]) -> None:
    run, result = finished_run
    out = run / "asr"
    config = read_part_config(out, asr.PART_NAME, SpeechEncoderConfig)
    assert config.d_model == MICRO_ENCODER["d_model"] and config.num_mel_bins == 80
    encoder = load_part_weights(out, asr.PART_NAME, SpeechEncoder(config))
    trained = load_file(str(out / "checkpoint" / "model.safetensors"))
    conv = encoder.state_dict()["whisper.conv1.weight"]
    assert torch.equal(conv, trained["whisper.model.encoder.conv1.weight"])
    states = encoder(encoder.log_mel(chirp(0, 1.0)))
    assert states.shape == (1, MICRO_ENCODER["max_source_positions"], MICRO_ENCODER["d_model"])
    assert result["steps_done"] == SMOKE["steps"] and result["train_clips"] == 5
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert {"loss", "ce", "ctc", "token_accuracy"} <= set(metrics["curves"])
    assert len(metrics["curves"]["loss"]) == SMOKE["steps"]
    assert metrics["dev"]["clips"] == 2 and {"cer", "wer", "exact"} <= set(metrics["dev"]["ctc"])
    assert result["dev_cer"] == metrics["dev"]["cer"] > 0.0  # four steps transcribe nothing right
    assert (out / "loss.png").is_file()


def test_cancelled_run_resumes_to_the_same_weights(tmp_path: Path, finished_run: tuple[Path, dict[str, Any]]) -> None:
    make_run(tmp_path)
    with pytest.raises(StageCancelled):
        run_stage(asr.run, context(tmp_path, cancel_after=3))
    state = json.loads((tmp_path / "asr" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    run_stage(asr.run, context(tmp_path))
    resumed = load_file(str(tmp_path / "asr" / f"{asr.PART_NAME}.safetensors"))
    straight = load_file(str(finished_run[0] / "asr" / f"{asr.PART_NAME}.safetensors"))
    assert resumed.keys() == straight.keys()
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)


def test_cropped_window_encoder_matches_the_hf_forward_on_the_whole_window() -> None:
    config = SpeechEncoderConfig(**MICRO_ENCODER)
    torch.manual_seed(0)
    model = asr.ASRModel(asr.whisper_config(config, byte_level_tokenizer(), asr.ASRSettings()), "chars").eval()
    features = SpeechEncoder(config).log_mel(chirp(1, 1.5))
    with torch.no_grad():
        ours = asr.encode_window(model.encoder, features)
        theirs = model.encoder(features).last_hidden_state
        cropped = asr.encode_window(model.encoder, features[:, :, :80])
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert cropped.shape == (1, 40, MICRO_ENCODER["d_model"])


def test_batch_holds_inference_features_and_shifted_targets() -> None:
    tokenizer = byte_level_tokenizer()
    encoder = SpeechEncoder(SpeechEncoderConfig(**MICRO_ENCODER))
    clips = [
        asr.Clip(Path("a.wav"), "Hi.", tuple(tokenizer.encode("Hi.")), "train", 0.5, "question"),
        asr.Clip(Path("b.wav"), "Yes, sir", tuple(tokenizer.encode("Yes, sir")), "train", 0.9, "question"),
    ]
    audios = [chirp(0, 0.5), chirp(1, 0.9)]
    batch = asr.make_batch(clips, audios, encoder, tokenizer, window=60, ctc_units="chars")
    assert batch.features.shape == (2, 80, 120)
    assert torch.equal(batch.features[1], encoder.log_mel(audios[1])[0, :, :120])
    assert batch.states == [26, 46]  # states cover the audio, rounded up to even, within the window
    ids, gap = list(clips[0].ids), len(clips[1].ids) - len(clips[0].ids)
    assert batch.decoder_ids[0].tolist() == [tokenizer.bos_id, *ids] + [tokenizer.pad_id] * gap
    assert batch.labels[0].tolist() == [*ids, tokenizer.eos_id] + [asr.IGNORE_INDEX] * gap
    assert batch.labels[1].tolist() == [*clips[1].ids, tokenizer.eos_id]
    assert batch.ctc_lengths == [2, 7]  # "hi", "yes sir"
    assert asr.ctc_text(batch.ctc_targets[:2].tolist(), "chars", tokenizer) == "hi"


def test_ctc_labels_of_characters_and_tokens() -> None:
    tokenizer = byte_level_tokenizer()
    clip = asr.Clip(Path("a.wav"), "What's 2, Bob?", tuple(tokenizer.encode("What's 2, Bob?")), "dev", 1.0, "question")
    chars = asr.ctc_labels(clip, "chars")
    assert asr.ctc_text(chars, "chars", tokenizer) == "what's 2 bob" and 0 not in chars
    assert asr.ctc_labels(clip, "tokens") == list(clip.ids)
    assert asr.ctc_text(list(clip.ids), "tokens", tokenizer) == "What's 2, Bob?"
    assert asr.ctc_blank("chars", tokenizer) == 0 and asr.ctc_blank("tokens", tokenizer) == tokenizer.pad_id


def test_error_rates_ignore_case_and_punctuation() -> None:
    assert asr.normalize("What's  the Capital, of France?") == "what's the capital of france"
    assert asr.edit_distance("kitten", "sitting") == 3
    rates = asr.error_rates(["Who is it?", "Name a sea."], ["who is it", "name the sea"])
    assert rates["wer"] == pytest.approx(1 / 6)
    assert rates["cer"] == pytest.approx(3 / 19)  # "a" → "the": one substitution, two insertions
    assert rates["exact"] == 0.5


def test_batch_schedule_is_fixed_by_seed_and_step() -> None:
    clips = [asr.Clip(Path(f"{i}.wav"), "x", (1,), "train", 1.0 + i / 10, "question") for i in range(10)]
    first, again = asr.BatchSchedule(clips, 3, seed=1), asr.BatchSchedule(clips, 3, seed=1)
    steps = [first.indices(s) for s in range(9)]
    assert steps == [again.indices(s) for s in range(9)]
    assert sorted(i for batch in steps[:4] for i in batch) == list(range(10))  # one epoch covers every clip


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        asr.ASRSettings.from_mapping({"epochs": 3})
    with pytest.raises(ConfigError, match="unknown"):
        asr.ASRSettings.from_mapping({"augment": {"reverb": 0.1}})
    with pytest.raises(ConfigError, match="ctc_units"):
        asr.ASRSettings.from_mapping({"ctc_units": "phones"})
    with pytest.raises(ConfigError, match="time_mask_share"):
        asr.ASRSettings.from_mapping({"time_masks": 2, "time_mask_share": 1.5})
    with pytest.raises(ConfigError, match="mask counts"):
        asr.ASRSettings.from_mapping({"freq_masks": -1})


def test_spec_augment_masks_bands_and_stretches_with_the_clip_mean() -> None:
    features = torch.randn(80, 200)
    mean = float(features.mean())
    masked = features.clone()
    settings = asr.ASRSettings(freq_masks=2, freq_mask_bins=10, time_masks=2, time_mask_share=0.1)
    asr.mask_spectrogram(masked, settings, np.random.default_rng(3))
    changed = masked != features
    rows, columns = changed.all(dim=1), changed.all(dim=0)
    assert 0 < int(rows.sum()) <= 20 and 0 < int(columns.sum()) <= 40  # two bands, two stretches at most
    assert torch.all(masked[changed] == mean)
    assert torch.equal(changed, rows.unsqueeze(1) | columns.unsqueeze(0))  # whole bands and stretches only
    again = features.clone()
    asr.mask_spectrogram(again, settings, np.random.default_rng(3))
    assert torch.equal(again, masked)  # the draws come from the generator alone
    untouched, rng = features.clone(), np.random.default_rng(3)
    asr.mask_spectrogram(untouched, asr.ASRSettings(), rng)
    assert torch.equal(untouched, features) and rng.integers(0, 10**9) == np.random.default_rng(3).integers(0, 10**9)
