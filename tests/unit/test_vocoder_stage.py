"""The iSTFT unit vocoder and the `vocoder` stage: shapes, alignment, losses, a smoke run with
the judge, outputs that load back, and resume after a cancel."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from echox.audio import SAMPLE_RATE, write_wav
from echox.errors import ConfigError, EchoXError
from echox.espeak import speak
from echox.models.istft_vocoder import InverseStft, IstftVocoder, IstftVocoderConfig, _sum_harmonics, _to_samples
from echox.models.vocoder import UnitVocoder
from training.stage import DONE_FILE, LOSS_PLOT, METRICS_FILE, StageCancelled, StageContext, run_stage
from training.stages import units, vocoder

MICRO = {"unit_embed_dim": 8, "hidden_dim": 16, "intermediate_dim": 32, "num_layers": 1, "dur_hidden_dim": 8}
ANSWERS = [
    ("capital-0000", "train", "The capital of France is Paris."),
    ("add-0001", "train", "Two plus three is five."),
    ("color-0001", "train", "The sky is blue."),
    ("capital-0002", "dev", "The capital of Italy is Rome."),
]


def _write_fake_synth(run_dir: Path) -> None:
    synth = run_dir / "synth"
    lines = []
    for fact_id, split, text in ANSWERS:
        audio = speak(text, "en-us+f2", 150, 50)
        path = f"audio/answers/a-{fact_id}.wav"
        write_wav(synth / path, audio)
        row = {"id": f"a-{fact_id}", "fact_id": fact_id, "split": split, "voice": "en-us+f2", "rate": 150,
               "pitch": 50, "text": text, "path": path, "seconds": audio.size / SAMPLE_RATE}
        lines.append(json.dumps(row) + "\n")
    (synth / "answers.jsonl").write_text("".join(lines))
    (synth / DONE_FILE).write_text("{}\n")


@pytest.fixture(scope="module")
def units_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a fake synth and a finished units stage (k = 10)."""
    folder = tmp_path_factory.mktemp("run")
    _write_fake_synth(folder)
    run_stage(units.run, StageContext(run_dir=folder, stage="units", settings={"num_units": 10}, seed=1))
    return folder


def _copy_inputs(units_run: Path, target: Path) -> Path:
    import shutil

    for stage in ("synth", "units"):
        shutil.copytree(units_run / stage, target / stage)
    return target


def _settings(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": MICRO, "steps": 4, "batch_size": 2, "segment_frames": 8, "duration_batch": 2,
        "log_every": 1, "checkpoint_every": 100, "judge": False, "samples": 0, "warmup_steps": 1,
        "duration_steps": 0,
    }
    return {**base, **changes}


class CountingReporter:
    """Records progress; optionally sets a cancel event once `cancel_at` steps have been done."""

    def __init__(self, cancel: threading.Event | None = None, cancel_at: int = 0) -> None:
        self.done = 0
        self.first_advance: int | None = None
        self.cancel, self.cancel_at = cancel, cancel_at

    def start(self, stage: str, total: int, unit: str = "steps") -> None:
        pass

    def advance(self, steps: int = 1, **metrics: float) -> None:
        if self.first_advance is None:
            self.first_advance = steps
        self.done += steps
        if self.cancel is not None and self.done >= self.cancel_at:
            self.cancel.set()

    def log(self, message: str) -> None:
        pass


# --- the model -----------------------------------------------------------------------------


def test_inverse_stft_inverts_the_matching_stft() -> None:
    n_fft, hop, frames = 640, 320, 12
    wav = torch.randn(2, frames * hop, generator=torch.Generator().manual_seed(0))
    side = (n_fft - hop) // 2
    padded = torch.nn.functional.pad(wav, (side, side))
    spec = torch.stft(padded, n_fft, hop, n_fft, torch.hann_window(n_fft), center=False, return_complex=True)
    assert spec.shape[-1] == frames
    torch.testing.assert_close(InverseStft(n_fft, hop)(spec), wav, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("head", "subframes"), [("harmonic", 1), ("harmonic", 2), ("spectrum", 2)])
def test_istft_vocoder_speaks_one_hop_per_frame(head: str, subframes: int) -> None:
    torch.manual_seed(0)
    model = IstftVocoder(IstftVocoderConfig(num_units=10, head=head, subframes=subframes, **MICRO)).eval()
    assert model(torch.randint(0, 10, (3, 7))).shape == (3, 7 * 320)
    audio = model.synthesize([1, 4, 2], torch.tensor([2, 3, 1]))
    assert audio.shape == (6 * 320,) and audio.dtype == torch.float32
    assert torch.equal(audio, model.synthesize([1, 4, 2], torch.tensor([2, 3, 1])))  # noise from a fixed seed
    predicted = model.predict_durations(torch.tensor([[1, 4, 2, 0]]), lengths=torch.tensor([3]))
    assert predicted[0, :3].min() >= 1 and predicted[0, 3] == 0
    assert model.synthesize([1, 4, 2]).numel() == int(model.predict_durations(torch.tensor([[1, 4, 2]])).sum()) * 320
    loss = model.duration_loss(torch.tensor([[1, 4, 2]]), torch.tensor([[2, 3, 0]]))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_harmonic_head_sings_the_f0_it_is_given() -> None:
    """A flat envelope and no noise: the output is periodic at the given F0 (its spectrum peaks
    on multiples of it), whatever F0 the head itself would predict."""
    config = IstftVocoderConfig(num_units=4, head="harmonic", subframes=2, **MICRO)
    model = IstftVocoder(config)
    with torch.no_grad():
        model.head.weight.zero_()
        bias = model.head.bias.view(config.subframes, config.head_outputs)
        bias.zero_()
        bias[:, 1 : 1 + config.envelope_bins] = -3.0  # every harmonic at amplitude 0.05
        bias[:, 1 + config.envelope_bins :] = -30.0  # no noise
    frames = 50
    with torch.no_grad():  # a fixed starting phase: the envelope read back below depends on it
        units, log_f0 = torch.zeros(1, frames, dtype=torch.long), torch.full((1, frames), np.log(250.0))
        wav = model.decode(model.encode(units), log_f0, generator=torch.Generator().manual_seed(0))[0]
    spectrum = torch.fft.rfft(wav * torch.hann_window(wav.numel())).abs()
    hz_per_bin = 16_000 / wav.numel()
    peak_hz = float(spectrum[int(100 / hz_per_bin) :].argmax()) * hz_per_bin + 100
    assert abs(peak_hz - 250.0 * round(peak_hz / 250.0)) < 3 * hz_per_bin
    fundamental = spectrum[round(250 / hz_per_bin)]
    assert fundamental > 20 * spectrum[round(375 / hz_per_bin)]  # nothing between the harmonics
    assert model.f0_loss(model.encode(torch.zeros(1, 3, dtype=torch.long)), torch.full((1, 3), np.log(200.0))) < 1e-5
    # The envelope target read back from that very output is the envelope that made it (to within
    # 0.02 to 0.07 in log-amplitude over twelve starting phases: the STFT peaks of neighbouring
    # harmonics overlap a little), and half the output reads back half the amplitude.
    voiced = torch.ones(1, frames, dtype=torch.bool)
    with torch.no_grad():
        frames_out = model.encode(units)
        assert float(model.envelope_loss(frames_out, wav[None], log_f0, voiced)) < 0.08
        assert abs(float(model.envelope_loss(frames_out, wav[None] * 0.5, log_f0, voiced)) - np.log(2)) < 0.08


@pytest.mark.parametrize(("hop", "frames"), [(320, 9), (160, 1), (5, 4), (1, 3)])
def test_harmonic_sum_is_the_per_sample_formula(hop: int, frames: int) -> None:
    """The block-wise harmonic sum equals Σ_k a_k(n) sin(2π k c(n)) with the amplitudes read at
    every sample as `_to_samples` interpolates them (even and odd hops), and so do its gradients."""
    generator = torch.Generator().manual_seed(0)
    amplitude = torch.rand(2, frames, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    cycles = torch.rand(2, frames * hop, dtype=torch.float64, generator=generator)
    order = torch.arange(1, 7, dtype=torch.float64)[None, :, None]
    per_sample = _to_samples(amplitude.transpose(1, 2), hop) * torch.sin(2 * math.pi * cycles.unsqueeze(1) * order)
    expected = per_sample.sum(dim=1)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), amplitude)
    got = _sum_harmonics(amplitude, cycles, hop)
    (got_grad,) = torch.autograd.grad(got.square().sum(), amplitude)
    torch.testing.assert_close(got, expected.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-10, rtol=1e-10)


def test_istft_vocoder_rejects_bad_input_and_config() -> None:
    model = IstftVocoder(IstftVocoderConfig(num_units=10, **MICRO))
    with pytest.raises(ValueError, match="unit ids"):
        model.synthesize([3, 10])
    with pytest.raises(ValueError, match="durations"):
        model.synthesize([3, 4], torch.tensor([1]))
    with pytest.raises(ConfigError):
        IstftVocoderConfig(n_fft=641)
    with pytest.raises(ConfigError):
        IstftVocoderConfig(architecture="hifigan")


def test_vocoder_settings_reject_unknown_keys_and_architectures() -> None:
    with pytest.raises(EchoXError, match="unknown keys"):
        vocoder.VocoderSettings.from_mapping({"epochs": 3})
    with pytest.raises(EchoXError, match="architecture"):
        vocoder.VocoderSettings.from_mapping({"architecture": "wavenet"})


# --- data and losses -----------------------------------------------------------------------


def test_crops_pair_each_unit_with_its_hop(units_run: Path) -> None:
    data = vocoder.load_utterances(units_run / "synth", units_run / "units", 320)
    assert [u.split for u in data] == [split for _, split, _ in ANSWERS]
    for utt in data:
        assert utt.audio.size == sum(utt.durations) * 320
    # A one-answer "corpus" whose frame i carries unit i % 10 and samples all equal to i.
    frames = 30
    fake = vocoder.Utterance(
        id="x", fact_id="x", split="train", audio=np.repeat(np.arange(frames, dtype=np.float32), 320),
        source=Path("x.wav"), units=tuple(i % 10 for i in range(frames)), durations=(1,) * frames,
        log_f0=np.arange(frames, dtype=np.float32), voiced=np.ones(frames, dtype=bool),
    )
    crops = vocoder.crop_batch([fake], 3, 8, 320, torch.Generator().manual_seed(0))
    assert crops.units.shape == (3, 8) and crops.audio.shape == (3, 8 * 320) and crops.log_f0.shape == (3, 8)
    first_frame = crops.audio[:, ::320].long()  # the sample value names the frame it came from
    assert torch.equal(first_frame % 10, crops.units)
    assert torch.equal(first_frame[:, 1:] - first_frame[:, :-1], torch.ones(3, 7, dtype=torch.long))
    assert torch.equal(crops.log_f0, first_frame.float())  # the F0 track is cropped with them


def test_duration_batch_pads_with_zero_durations(units_run: Path) -> None:
    data = vocoder.load_utterances(units_run / "synth", units_run / "units", 320)
    unit_batch, durations = vocoder.duration_batch(data, 4, torch.Generator().manual_seed(0))
    lengths = (durations > 0).sum(1)
    assert unit_batch.shape == durations.shape and int(lengths.max()) == durations.shape[1]
    answers = {(u.units, u.durations) for u in data}
    for row, length in enumerate(lengths.tolist()):
        assert (tuple(unit_batch[row, :length].tolist()), tuple(durations[row, :length].tolist())) in answers


def test_spectral_loss_is_zero_for_a_perfect_copy_and_grows_with_error() -> None:
    loss = vocoder.SpectralLoss()
    wav = 0.1 * torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    same = loss(wav, wav)
    assert float(same["stft"]) < 1e-5 and float(same["mel"]) < 1e-5
    noisy = loss(wav + 0.05 * torch.randn(2, 4000), wav)
    assert float(noisy["stft"]) > 0.1 and float(noisy["mel"]) > 0.1


# --- the stage -----------------------------------------------------------------------------


def test_stage_smoke_run_writes_parts_metrics_plot_and_judge_figures(units_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_inputs(units_run, tmp_path)
    ctx = StageContext(
        run_dir=run_dir, stage="vocoder", settings=_settings(judge=True, samples=1),
        facts=Path(__file__).resolve().parents[2] / "data" / "spoken_qa",
    )
    summary = run_stage(vocoder.run, ctx)
    out = run_dir / "vocoder"
    assert summary["steps"] == 4 and summary["architecture"] == "istft"
    model = vocoder.load_vocoder(out)
    assert isinstance(model, IstftVocoder) and model.config.num_units == 10
    assert model.synthesize([1, 2, 3], torch.tensor([1, 1, 2])).shape == (4 * 320,)
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert [step for step, _ in metrics["curves"]["loss"]] == [1, 2, 3, 4]
    assert {"stft", "mel", "head", "duration"} <= set(metrics["curves"])
    assert (out / LOSS_PLOT).stat().st_size > 0
    for name in ("judge_original", "judge_resynth_true", "judge_resynth_predicted"):
        assert 0.0 <= summary[name] <= 1.0
    assert summary["judged_answers"] == 1
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "a-capital-0002.resynth_predicted.wav", "a-capital-0002.resynth_true.wav",
    ]


def test_stage_trains_the_hifigan_vocoder_too(units_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_inputs(units_run, tmp_path)
    model_overrides = {
        "unit_embed_dim": 8, "upsample_initial_channel": 16, "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1]], "dur_hidden_dim": 8,
    }
    settings = _settings(architecture="hifigan", model=model_overrides, steps=2)
    summary = run_stage(vocoder.run, StageContext(run_dir=run_dir, stage="vocoder", settings=settings))
    assert summary["steps"] == 2
    assert isinstance(vocoder.load_vocoder(run_dir / "vocoder"), UnitVocoder)


def test_stage_resumes_after_a_cancel(units_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_inputs(units_run, tmp_path)
    cancel = threading.Event()
    first = CountingReporter(cancel, cancel_at=3)
    ctx = StageContext(run_dir=run_dir, stage="vocoder", settings=_settings(steps=6), reporter=first, cancel=cancel)
    with pytest.raises(StageCancelled):
        run_stage(vocoder.run, ctx)
    state = json.loads((run_dir / "vocoder" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and not (run_dir / "vocoder" / DONE_FILE).exists()
    second = CountingReporter()
    ctx = StageContext(run_dir=run_dir, stage="vocoder", settings=_settings(steps=6), reporter=second)
    summary = run_stage(vocoder.run, ctx)
    assert second.first_advance == 3 and second.done == 6  # continued from step 3, not from 0
    assert summary["steps"] == 6
    steps = [step for step, _ in json.loads((run_dir / "vocoder" / METRICS_FILE).read_text())["curves"]["loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_weight_average_is_the_part_and_resumes_with_the_vocoder(units_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    settings = _settings(steps=6, average_decay=0.9)
    unbroken = _copy_inputs(units_run, tmp_path / "unbroken")
    run_stage(vocoder.run, StageContext(run_dir=unbroken, stage="vocoder", settings=settings))
    part = load_file(str(unbroken / "vocoder" / "vocoder.safetensors"))
    averaged = load_file(str(unbroken / "vocoder" / "checkpoint" / "average.safetensors"))
    last = load_file(str(unbroken / "vocoder" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(part[name], averaged[name]) for name in part)  # the part is the average
    assert any(not torch.equal(part[name], last[name]) for name in part)  # not the last step's weights
    run_dir = _copy_inputs(units_run, tmp_path / "resumed")
    cancel = threading.Event()
    ctx = StageContext(run_dir=run_dir, stage="vocoder", settings=settings,
                       reporter=CountingReporter(cancel, cancel_at=3), cancel=cancel)
    with pytest.raises(StageCancelled):
        run_stage(vocoder.run, ctx)
    run_stage(vocoder.run, StageContext(run_dir=run_dir, stage="vocoder", settings=settings))
    resumed = load_file(str(run_dir / "vocoder" / "vocoder.safetensors"))
    assert all(torch.allclose(resumed[name], part[name], atol=1e-6) for name in part)  # as if unbroken
    with pytest.raises(EchoXError, match="average_decay"):
        vocoder.VocoderSettings.from_mapping({"average_decay": 1.0})


def test_discriminator_joins_late_and_resumes_with_the_vocoder(units_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_inputs(units_run, tmp_path)
    gan = {"adversarial_weight": 1.0, "feature_matching_weight": 2.0, "adversarial_start": 0.5,
           "discriminator_channels": 4, "discriminator_resolutions": [64, 128]}
    cancel = threading.Event()
    ctx = StageContext(run_dir=run_dir, stage="vocoder", settings=_settings(steps=6, **gan),
                       reporter=CountingReporter(cancel, cancel_at=4), cancel=cancel)
    with pytest.raises(StageCancelled):
        run_stage(vocoder.run, ctx)
    saved = run_dir / "vocoder" / "checkpoint" / "discriminator"
    assert json.loads((saved / "state.json").read_text())["step"] == 4
    from safetensors.torch import load_file

    at_cancel = load_file(str(saved / "model.safetensors"))
    import shutil

    finished = shutil.copytree(run_dir, tmp_path / "finished")  # a schedule of 4 steps: done, saved again
    run_stage(vocoder.run, StageContext(run_dir=finished, stage="vocoder", settings=_settings(steps=4, **gan)))
    reloaded = load_file(str(finished / "vocoder" / "checkpoint" / "discriminator" / "model.safetensors"))
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in at_cancel.items())  # loaded, not new
    ctx = StageContext(run_dir=run_dir, stage="vocoder", settings=_settings(steps=6, **gan))
    assert run_stage(vocoder.run, ctx)["steps"] == 6
    curves = json.loads((run_dir / "vocoder" / METRICS_FILE).read_text())["curves"]
    assert [step for step, _ in curves["loss"]] == [1, 2, 3, 4, 5, 6]
    for name in ("discriminator", "adversarial", "feature_matching"):  # from half the schedule on
        assert [step for step, _ in curves[name]] == [4, 5, 6], name
    after = load_file(str(saved / "model.safetensors"))
    assert any(not torch.equal(after[name], tensor) for name, tensor in at_cancel.items())  # it kept learning
    plain_dir = _copy_inputs(units_run, tmp_path / "plain")
    run_stage(vocoder.run, StageContext(run_dir=plain_dir, stage="vocoder", settings=_settings(steps=2)))
    assert not (plain_dir / "vocoder" / "checkpoint" / "discriminator").exists()
    with pytest.raises(EchoXError, match="adversarial"):
        vocoder.VocoderSettings.from_mapping({"adversarial_weight": -1.0})
    for bad in ({"discriminator_resolutions": [8, 64]}, {"discriminator_channels": 0}, {"discriminator_batch": 0}):
        with pytest.raises(EchoXError, match="discriminator"):
            vocoder.VocoderSettings.from_mapping(bad)


def test_duration_fit_trains_the_duration_predictor_alone(units_run: Path, tmp_path: Path) -> None:
    parts = {}
    for duration_steps in (0, 40):
        run_dir = _copy_inputs(units_run, tmp_path / str(duration_steps))
        settings = _settings(steps=2, duration_steps=duration_steps, log_every=10)
        summary = run_stage(vocoder.run, StageContext(run_dir=run_dir, stage="vocoder", settings=settings))
        parts[duration_steps] = (vocoder.load_vocoder(run_dir / "vocoder"), summary, run_dir)
    (plain, plain_summary, run_dir), (fitted, summary, fitted_dir) = parts[0], parts[40]
    assert plain_summary["final_duration_fit"] is None and summary["duration_fit_steps"] == 40
    curve = json.loads((fitted_dir / "vocoder" / METRICS_FILE).read_text())["curves"]["duration_fit"]
    assert [step for step, _ in curve] == [10, 20, 30, 40] and curve[-1][1] < curve[0][1]
    fitted_state, plain_state = fitted.state_dict(), plain.state_dict()
    for name, tensor in plain_state.items():
        same = torch.equal(fitted_state[name], tensor)
        assert same != name.startswith("dur_predictor."), name  # only the predictor moved
    train = [u for u in vocoder.load_utterances(run_dir / "synth", run_dir / "units", 320) if u.split == "train"]
    units, durations = vocoder.duration_batch(train, len(train), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert fitted.eval().duration_loss(units, durations) < plain.eval().duration_loss(units, durations)


def test_time_cap_ends_the_schedule_and_says_so(units_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_inputs(units_run, tmp_path)
    settings = _settings(steps=50, max_minutes=1e-6)  # the cap ends training after its first step
    summary = run_stage(vocoder.run, StageContext(run_dir=run_dir, stage="vocoder", settings=settings))
    assert summary["steps"] == 1 and summary["stopped_early"] is True
    state = json.loads((run_dir / "vocoder" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1 and state["extra"]["elapsed_s"] > 0  # a resumed run keeps the spent time


def test_answer_variants_add_rendered_agent_speech_but_never_a_dev_answer(units_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_inputs(units_run, tmp_path)
    facts = Path(__file__).resolve().parents[2] / "data" / "spoken_qa"
    ctx = StageContext(run_dir=run_dir, stage="vocoder", settings=_settings(answer_variants=2), facts=facts)
    texts, voice = vocoder.agent_texts(ctx, vocoder.VocoderSettings.from_mapping(ctx.settings))
    assert texts and "The capital of Italy is Rome." not in texts
    assert voice["voice"] == "en-us+f2"
    rendered = vocoder.rendered_utterances(texts[:2], run_dir / "units", voice, hop_length=320)
    for utt in rendered:
        assert utt.split == "train" and utt.audio.size == sum(utt.durations) * 320
        assert len(utt.units) == len(utt.durations) and max(utt.units) < 10
    summary = run_stage(vocoder.run, ctx)
    assert summary["train_utterances"] == 3 + len(texts)  # three train answers and the rendered texts


def test_encoder_feature_loss_reads_the_asr_stages_encoder(units_run: Path, tmp_path: Path) -> None:
    from echox.checkpoint import save_part
    from tests.unit.test_encoder_units import micro_encoder
    from training.features import ENCODER_PART

    run_dir = _copy_inputs(units_run, tmp_path)
    settings = _settings(steps=3, encoder_feature_weight=0.5, encoder_feature_batch=1)
    with pytest.raises(FileNotFoundError, match="asr"):  # the recipe must run asr first
        run_stage(vocoder.run, StageContext(run_dir=run_dir, stage="vocoder", settings=settings))
    encoder = micro_encoder()
    save_part(run_dir / "asr", ENCODER_PART, encoder, encoder.config)
    (run_dir / "asr" / DONE_FILE).write_text("{}\n")
    run_stage(vocoder.run, StageContext(run_dir=run_dir, stage="vocoder", settings=settings))
    curves = json.loads((run_dir / "vocoder" / METRICS_FILE).read_text())["curves"]
    assert [step for step, _ in curves["encoder_feature"]] == [1, 2, 3]
    assert all(value > 0 for _, value in curves["encoder_feature"])
    for bad in ({"encoder_feature_weight": -1.0}, {"encoder_feature_batch": 0}):
        with pytest.raises(EchoXError, match="encoder_feature"):
            vocoder.VocoderSettings.from_mapping(bad)
