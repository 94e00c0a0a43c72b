"""Stage `vocoder`: the unit vocoder learns to speak the agent's answers from their units.

Data: every agent answer's audio (`RUN/synth/answers.jsonl`) and its deduplicated units and
durations (`RUN/units/units.jsonl`). The generator sees frame-rate units (units expanded by
their durations) in random fixed-length crops and reconstructs the matching samples (unit t ↔
samples [t·hop, (t+1)·hop)); the duration predictor learns the durations alongside on whole
answers (`duration_loss`), so synthesis from deduplicated units alone works. With `questions`
and `answer_variants` the stage also renders the texts T2C learns from (every question phrasing,
train answers with swapped key words; never a held-out answer) in the agent voice with
espeak-ng and learns from them too: 279 train answers are only 10 minutes of speech.

Losses (`training/vocoder_losses.py`) converge fast on CPU without a discriminator:
multi-resolution STFT (spectral convergence + log-magnitude L1) and log-mel L1 on the waveform.
`adversarial_weight` and `feature_matching_weight` add a multi-resolution spectrogram
discriminator for the later part of the schedule (`adversarial_start`); `encoder_feature_weight`
the asr stage's encoder as an ear (`EncoderFeatureLoss`). The default architecture
is the iSTFT head (`echox.models.istft_vocoder`): its network runs at 50 Hz, so it trains in
minutes on two cores; `architecture: hifigan` trains `UnitVocoder` with the same losses.

At the end the dev answers are resynthesised from their OWN units, with their true durations
and with predicted ones, and the ASR judge (Whisper tiny.en) scores the share of answers whose
key words it hears, beside its share on the original espeak-ng recordings.

Output (`RUN/vocoder/`): `vocoder.safetensors` + `vocoder.json` (save_part), metrics.json (loss
curves, judge shares and misses), loss.png, `samples/` (a few dev resyntheses) and
`checkpoint/` for resume (with `checkpoint/discriminator/` when there is one, and
`average.safetensors` when `average_decay` is set).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from echox.audio import read_wav, write_wav
from echox.checkpoint import load_part_weights, read_part_config, save_part
from echox.errors import EchoXError, ModelLoadError
from echox.models.istft_vocoder import ARCHITECTURE as ISTFT
from echox.models.istft_vocoder import IstftVocoder, IstftVocoderConfig
from echox.models.vocoder import VocoderConfig
from echox.models.vocoders import AnyVocoder, AnyVocoderConfig, build_vocoder
from echox.units.codec import expand
from training.features import PitchConfig, UnitExtractor, continuous_log_f0, load_speech_encoder, pitch_track
from training.stage import (
    MetricsLog,
    StageContext,
    WeightAverage,
    load_training_state,
    optimizer_step,
    save_training_state,
    schedule_progress,
    set_learning_rate,
    settings_kwargs,
    warmup_cosine,
)
from training.stages.units import answers_with_units
from training.vocoder_losses import Adversary, EncoderFeatureLoss, SpectralLoss, head_loss

PART_NAME = "vocoder"
CHECKPOINT_DIR = "checkpoint"
DISCRIMINATOR_DIR = "discriminator"  # under CHECKPOINT_DIR
SAMPLES_DIR = "samples"
HIFIGAN = "hifigan"


@dataclasses.dataclass(frozen=True)
class VocoderSettings:
    """`settings.vocoder` of a recipe."""

    architecture: str = ISTFT  # "istft" (Vocos-style head) or "hifigan" (UnitVocoder)
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config overrides
    steps: int = 3000
    batch_size: int = 16
    segment_frames: int = 48  # crop length in units (0.96 s at 50 Hz)
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    head_weight: float = 1.0  # direct magnitude target: the spectrum bins, or the harmonic envelope
    f0_weight: float = 1.0  # harmonic head only: log-F0 L1 against the pitch track
    duration_weight: float = 1.0
    # The discriminator (training/vocoder_losses.py): 0 weights leave it out. It joins once
    # `adversarial_start` of the schedule has passed, when the spectral losses have done the rough work.
    adversarial_weight: float = 0.0
    feature_matching_weight: float = 0.0
    adversarial_start: float = 0.3
    discriminator_learning_rate: float = 2e-4
    discriminator_channels: int = 16
    discriminator_resolutions: tuple[int, ...] = (256, 512, 1024)
    discriminator_batch: int = 8  # the first N crops of each batch: half the batch, half the cost
    duration_batch: int = 16  # whole answers per step for the duration predictor
    # After the joint loop, steps for the duration predictor alone (unit table frozen): the joint
    # loop's ~1,600 steps leave it undertrained. 0: none.
    duration_steps: int = 3000
    duration_learning_rate: float = 2e-3
    log_every: int = 25
    checkpoint_every: int = 250
    max_minutes: float = 8.0  # training time cap; the LR schedule ends by then too; 0: none
    # An exponential moving average of the weights (decay per step), saved as the part in place of
    # the last step's weights; 0: none. The last step's weights stay in checkpoint/.
    average_decay: float = 0.0
    # The run's trained speech encoder as an ear (EncoderFeatureLoss) on the first N crops of each
    # step; needs the asr stage before this one. 0: none.
    encoder_feature_weight: float = 0.0
    encoder_feature_batch: int = 8
    threads: int | None = None  # torch threads while training (None: leave torch's default)
    judge: bool = True  # score dev resyntheses with Whisper tiny.en (needs faster-whisper)
    judge_limit: int | None = None  # judge only the first N dev answers
    samples: int = 4  # dev resyntheses written to samples/ for listening
    init_from_centroids: bool = True  # unit embeddings start from the k-means centroids
    # More agent-voice speech to learn from than the train answers alone (the texts T2C renders):
    questions: bool = False  # every question phrasing of the fact base
    answer_variants: int = 0  # per train answer: its key words or slot values swapped (t2c's)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> VocoderSettings:
        kwargs = settings_kwargs(cls, values, "vocoder")
        if "discriminator_resolutions" in kwargs:
            kwargs["discriminator_resolutions"] = tuple(kwargs["discriminator_resolutions"])
        settings = cls(**kwargs)
        if settings.architecture not in (ISTFT, HIFIGAN):
            raise EchoXError(f"vocoder: architecture must be {ISTFT!r} or {HIFIGAN!r}, got {settings.architecture!r}")
        sizes = (settings.steps, settings.batch_size, settings.segment_frames, settings.duration_batch)
        if min(sizes) < 1 or settings.encoder_feature_batch < 1 or settings.encoder_feature_weight < 0:
            raise EchoXError("vocoder: steps, batch_size, segment_frames, duration_batch and encoder_feature_batch "
                             "must be >= 1, encoder_feature_weight >= 0")
        if settings.duration_steps < 0:
            raise EchoXError(f"vocoder: duration_steps must be >= 0, got {settings.duration_steps}")
        if not 0.0 <= settings.average_decay < 1.0:
            raise EchoXError(f"vocoder: average_decay must be in [0, 1), got {settings.average_decay}")
        if min(settings.adversarial_weights) < 0 or not 0 <= settings.adversarial_start <= 1:
            raise EchoXError("vocoder: adversarial weights must be >= 0 and adversarial_start in [0, 1]")
        resolutions = settings.discriminator_resolutions
        counts = (settings.discriminator_channels, settings.discriminator_batch)
        if not resolutions or min(resolutions) < 16 or min(counts) < 1:
            raise EchoXError("vocoder: discriminator_resolutions must be >= 16 samples, its channels and batch >= 1")
        return settings

    @property
    def adversarial_weights(self) -> tuple[float, float]:
        """The generator's weights on the adversarial and the feature-matching terms."""
        return self.adversarial_weight, self.feature_matching_weight

    @property
    def adversarial(self) -> bool:
        return max(self.adversarial_weights) > 0


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One agent answer: its audio (exactly frames·hop samples) and its units."""

    id: str
    fact_id: str
    split: str
    audio: npt.NDArray[np.float32]
    source: Path | None  # the original recording (judged as it is, uncut); None: rendered here
    units: tuple[int, ...]  # deduplicated
    durations: tuple[int, ...]
    log_f0: npt.NDArray[np.float32]  # per frame, unvoiced frames interpolated (harmonic head target)
    voiced: npt.NDArray[np.bool_]  # per frame: the pitch tracker found a period

    @property
    def frame_units(self) -> list[int]:
        return expand(self.units, self.durations)


# --- data --------------------------------------------------------------------------------


def load_utterances(synth_dir: Path, units_dir: Path, hop_length: int) -> list[Utterance]:
    """Every agent answer with its units; the audio is cut to the units' frames."""
    out = []
    for answer, row in answers_with_units(synth_dir, units_dir, "vocoder"):
        frames = sum(row["durations"])
        audio = read_wav(synth_dir / answer["path"])
        if audio.size < frames * hop_length:
            raise EchoXError(f"vocoder: {row['id']} has {frames} units but only {audio.size} samples")
        f0 = pitch_track(audio[: frames * hop_length], PitchConfig(hop_length=hop_length))
        out.append(
            Utterance(
                id=row["id"], fact_id=row["fact_id"], split=row["split"], audio=audio[: frames * hop_length],
                source=synth_dir / answer["path"], units=tuple(row["units"]), durations=tuple(row["durations"]),
                log_f0=continuous_log_f0(f0), voiced=f0 > 0,
            )
        )
    return out


def rendered_utterances(
    texts: Sequence[str], units_dir: Path, voice: Mapping[str, Any], hop_length: int
) -> list[Utterance]:
    """`texts` said by espeak-ng in the agent's voice (`voice`: a synth answer row's voice, rate
    and pitch), with their units from the units stage's k-means: more training speech for the
    vocoder and its duration predictor. Never a dev answer: the caller passes train texts."""
    from echox.units.codec import dedup
    from training.stages.t2c import spoken_in_voice

    extractor = UnitExtractor.load(units_dir)
    spoken = spoken_in_voice(texts, str(voice["voice"]), int(voice["rate"]), int(voice["pitch"]))
    out = []
    for index, audio in enumerate(spoken):
        units, durations = dedup(extractor.frame_units(audio))
        frames = sum(durations)
        audio = np.pad(audio, (0, max(0, frames * hop_length - audio.size)))[: frames * hop_length]
        f0 = pitch_track(audio, PitchConfig(hop_length=hop_length))
        out.append(
            Utterance(
                id=f"rendered-{index:05d}", fact_id="", split="train", audio=audio, source=None,
                units=tuple(units), durations=tuple(durations), log_f0=continuous_log_f0(f0), voiced=f0 > 0,
            )
        )
    return out


def agent_texts(ctx: StageContext, settings: VocoderSettings) -> tuple[list[str], Mapping[str, Any]]:
    """The extra texts to render (questions, answer variants) and the agent's voice."""
    from training.stages.t2c import FactTexts, answer_rows, answer_variants

    rows = answer_rows(ctx.run_dir)
    facts = FactTexts.load(ctx.facts)
    texts = list(facts.questions) if settings.questions else []
    texts += answer_variants(rows, facts.facts, settings.answer_variants, ctx.seed)
    held_out = {row["text"] for row in rows if row["split"] != "train"}
    return [t for t in dict.fromkeys(texts) if t not in held_out], rows[0]


@dataclasses.dataclass(frozen=True)
class Crops:
    units: torch.Tensor  # [B, T] frame-rate units
    audio: torch.Tensor  # [B, T·hop] their samples
    log_f0: torch.Tensor  # [B, T]
    voiced: torch.Tensor  # bool [B, T]


def crop_batch(
    utterances: Sequence[Utterance], batch_size: int, segment_frames: int, hop_length: int, generator: torch.Generator
) -> Crops:
    """Random crops of frame units, samples and log F0. An answer shorter than the crop is padded
    with its last unit, its last F0 and silence."""
    units = torch.zeros(batch_size, segment_frames, dtype=torch.long)
    audio = torch.zeros(batch_size, segment_frames * hop_length)
    log_f0 = torch.zeros(batch_size, segment_frames)
    voiced = torch.zeros(batch_size, segment_frames, dtype=torch.bool)
    picks = torch.randint(len(utterances), (batch_size,), generator=generator).tolist()
    for row, index in enumerate(picks):
        utt = utterances[index]
        frame_units = torch.tensor(utt.frame_units)
        total = frame_units.numel()
        start = int(torch.randint(max(1, total - segment_frames + 1), (1,), generator=generator))
        length = min(segment_frames, total)
        units[row, :length] = frame_units[start : start + length]
        units[row, length:] = frame_units[-1]
        samples = utt.audio[start * hop_length : (start + length) * hop_length]
        audio[row, : samples.size] = torch.from_numpy(samples)
        log_f0[row, :length] = torch.from_numpy(utt.log_f0[start : start + length])
        log_f0[row, length:] = float(utt.log_f0[-1])
        voiced[row, :length] = torch.from_numpy(utt.voiced[start : start + length])
    return Crops(units, audio, log_f0, voiced)


def duration_batch(
    utterances: Sequence[Utterance], batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole answers, right-padded: dedup units [B, N] and durations [B, N] (0 = padding)."""
    picks = torch.randint(len(utterances), (batch_size,), generator=generator).tolist()
    width = max(len(utterances[i].units) for i in picks)
    units = torch.zeros(batch_size, width, dtype=torch.long)
    durations = torch.zeros(batch_size, width, dtype=torch.long)
    for row, index in enumerate(picks):
        utt = utterances[index]
        units[row, : len(utt.units)] = torch.tensor(utt.units)
        durations[row, : len(utt.durations)] = torch.tensor(utt.durations)
    return units, durations


# --- model -------------------------------------------------------------------------------


def vocoder_config(settings: VocoderSettings, num_units: int) -> VocoderConfig | IstftVocoderConfig:
    overrides = {**dict(settings.model), "num_units": num_units}
    if settings.architecture == ISTFT:
        return IstftVocoderConfig.from_dict(overrides)
    return VocoderConfig.from_dict({**VocoderConfig.tiny().to_dict(), **overrides})


def load_vocoder(folder: Path, name: str = PART_NAME) -> AnyVocoder:
    """A trained vocoder part of either architecture (dispatch on its config's `architecture`)."""
    path = folder / f"{name}.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    is_istft = isinstance(meta, dict) and meta.get("config", {}).get("architecture") == ISTFT
    config: AnyVocoderConfig
    if is_istft:
        config = read_part_config(folder, name, IstftVocoderConfig)
    else:
        config = read_part_config(folder, name, VocoderConfig)
    model = build_vocoder(config)
    load_part_weights(folder, name, model)
    return model.eval()


def init_unit_embeddings(model: AnyVocoder, centroids: torch.Tensor) -> None:
    """Starts each unit's embedding from its k-means centroid (normalised log-mel), so the network
    begins from "which sound is this" instead of a random code; extra dimensions stay random."""
    dim = min(centroids.shape[1], model.unit_embed.weight.shape[1])
    with torch.no_grad():
        model.unit_embed.weight[:, :dim] = centroids[:, :dim]


# --- training ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int
    losses: dict[str, float]  # mean of the last logged window
    stopped_early: bool


def _step_losses(
    model: AnyVocoder, loss_fn: SpectralLoss, crops: Crops, train: Sequence[Utterance], settings: VocoderSettings,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The spectral, head, F0 and duration losses of one batch, and the generated audio."""
    zero = crops.audio.new_zeros(())
    if isinstance(model, IstftVocoder):
        frames = model.encode(crops.units)
        generated = model.decode(frames, crops.log_f0, generator)
        parts = loss_fn(generated, crops.audio)
        parts["f0"] = model.f0_loss(frames, crops.log_f0)
        if model.config.head == "spectrum":
            parts["head"] = head_loss(model.spectrum(frames), crops.audio, model.config)
        else:
            parts["head"] = model.envelope_loss(frames, crops.audio, crops.log_f0, crops.voiced)
    else:
        generated = model(crops.units)
        parts = loss_fn(generated, crops.audio)
        parts["f0"] = parts["head"] = zero
    dur_units, durations = duration_batch(train, settings.duration_batch, generator)
    parts["duration"] = model.duration_loss(dur_units, durations)
    parts["loss"] = (
        settings.stft_weight * parts["stft"] + settings.mel_weight * parts["mel"]
        + settings.head_weight * parts["head"] + settings.f0_weight * parts["f0"]
        + settings.duration_weight * parts["duration"]
    )
    return parts, generated


def train_vocoder(
    ctx: StageContext, model: AnyVocoder, train: Sequence[Utterance], settings: VocoderSettings,
    ear: EncoderFeatureLoss | None = None,
) -> TrainResult:
    """AdamW with warmup + cosine over steps or `max_minutes` of training, whichever ends first;
    resumes from `checkpoint/`, checkpoints every `checkpoint_every` steps, when cancelled and at
    the end. With `average_decay` the model leaves with the averaged weights."""
    if not train:
        raise EchoXError("vocoder: no training answers")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.8, 0.99), weight_decay=settings.weight_decay
    )
    loss_fn = SpectralLoss(sample_rate=model.config.sample_rate)
    state_dir = ctx.out / CHECKPOINT_DIR
    average = WeightAverage(model, settings.average_decay) if settings.average_decay else None
    step, extra = load_training_state(state_dir, model, optimizer, average)
    adversary = _load_adversary(settings, state_dir)
    metrics = MetricsLog(ctx.out)
    for name, points in metrics.curves.items():  # a run killed after its checkpoint logged more
        metrics.curves[name] = [point for point in points if point[0] <= step]
    ctx.reporter.start(ctx.stage, settings.steps)
    ctx.reporter.advance(step)
    elapsed_before, started = float(extra.get("elapsed_s", 0.0)), time.perf_counter()
    elapsed = elapsed_before
    progress = schedule_progress(step, settings.steps, elapsed, settings.max_minutes)
    window: dict[str, list[float]] = {}
    model.train()
    while progress < 1.0:
        if ctx.cancel.is_set():  # keep every finished step: the rerun continues from here
            _save_state(state_dir, model, optimizer, adversary, average, step, elapsed)
            metrics.save()
            ctx.check_cancelled()
        factor = warmup_cosine(step, settings.warmup_steps, progress, settings.min_lr_ratio)
        set_learning_rate(optimizer, settings.learning_rate * factor)
        generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + step)
        crops = crop_batch(train, settings.batch_size, settings.segment_frames, model.config.hop_length, generator)
        parts, generated = _step_losses(model, loss_fn, crops, train, settings, generator)
        if adversary is not None and progress >= settings.adversarial_start:
            shown = settings.discriminator_batch
            adversary.add_terms(parts, crops.audio[:shown], generated[:shown], settings.adversarial_weights, factor)
        if ear is not None:
            heard = settings.encoder_feature_batch
            parts["encoder_feature"] = ear(generated[:heard], crops.audio[:heard])
            parts["loss"] = parts["loss"] + settings.encoder_feature_weight * parts["encoder_feature"]
        optimizer_step(optimizer, parts["loss"], model.parameters(), settings.grad_clip)
        if average is not None:
            average.update(model)
        step += 1
        elapsed = elapsed_before + time.perf_counter() - started
        progress = schedule_progress(step, settings.steps, elapsed, settings.max_minutes)
        for name, value in parts.items():
            window.setdefault(name, []).append(float(value.detach()))
        ctx.reporter.advance(1, loss=window["loss"][-1])
        if step % settings.log_every == 0 or progress >= 1.0:
            metrics.add(step, **{name: sum(values) / len(values) for name, values in window.items()})
            window = {}
        if step % settings.checkpoint_every == 0:
            _save_state(state_dir, model, optimizer, adversary, average, step, elapsed)
            metrics.save()
    stopped_early = step < settings.steps
    if stopped_early:
        ctx.reporter.log(f"vocoder: time budget of {settings.max_minutes} min reached at step {step}")
    _save_state(state_dir, model, optimizer, adversary, average, step, elapsed)
    metrics.set(final_step=step, stopped_early=stopped_early)
    metrics.save()
    if average is not None:
        average.copy_to(model)
    final = {name: points[-1][1] for name, points in metrics.curves.items() if points}
    return TrainResult(step, final, stopped_early)


def _load_adversary(settings: VocoderSettings, state_dir: Path) -> Adversary | None:
    """The discriminator when the settings ask for one, resumed from its checkpoint if any."""
    if not settings.adversarial:
        return None
    adversary = Adversary(
        settings.discriminator_resolutions, settings.discriminator_channels, settings.discriminator_learning_rate
    )
    load_training_state(state_dir / DISCRIMINATOR_DIR, adversary.discriminator, adversary.optimizer)
    return adversary


def _save_state(
    folder: Path, model: AnyVocoder, optimizer: torch.optim.Optimizer, adversary: Adversary | None,
    average: WeightAverage | None, step: int, elapsed: float,
) -> None:
    """The discriminator first: the vocoder's state.json, written last, names the step resumed."""
    if adversary is not None:
        save_training_state(folder / DISCRIMINATOR_DIR, adversary.discriminator, adversary.optimizer, step)
    save_training_state(folder, model, optimizer, step, {"elapsed_s": elapsed}, average)


def fit_durations(
    ctx: StageContext, model: AnyVocoder, train: Sequence[Utterance], settings: VocoderSettings
) -> float | None:
    """`duration_steps` steps of the duration predictor alone (AdamW, cosine to min_lr_ratio),
    the vocoder's unit table frozen; returns the mean loss of the last 100 steps. Deterministic
    for a seed, so a stage resumed after its joint loop simply redoes it (3,000 steps took 71 s
    on two cores). On 49 held-out answers of the tiny recipe it lifted the judge's share of
    resyntheses with predicted durations from 0.61 to 0.69."""
    if settings.duration_steps == 0:
        return None
    optimizer = torch.optim.AdamW(
        model.dur_predictor.parameters(), lr=settings.duration_learning_rate, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 7)
    metrics, losses = MetricsLog(ctx.out), list[float]()
    metrics.curves.pop("duration_fit", None)  # a rerun after a crash past this point redoes it
    ctx.reporter.start(f"{ctx.stage} durations", settings.duration_steps)
    model.train()
    for step in range(settings.duration_steps):
        ctx.check_cancelled()
        factor = warmup_cosine(step, 0, step / settings.duration_steps, settings.min_lr_ratio)
        set_learning_rate(optimizer, settings.duration_learning_rate * factor)
        units, durations = duration_batch(train, settings.duration_batch, generator)
        loss = model.duration_loss(units, durations)
        model.zero_grad(set_to_none=True)  # the unit table gets gradients too; only the predictor steps
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
        ctx.reporter.advance(1, loss=losses[-1])
        if (step + 1) % settings.log_every == 0:
            metrics.add(step + 1, duration_fit=float(np.mean(losses[-settings.log_every :])))
    model.zero_grad(set_to_none=True)
    metrics.save()
    return float(np.mean(losses[-100:]))


# --- evaluation --------------------------------------------------------------------------


def resynthesize(model: AnyVocoder, utterance: Utterance, true_durations: bool) -> npt.NDArray[np.float32]:
    """The answer spoken back from its own deduplicated units (true or predicted durations)."""
    durations = torch.tensor(utterance.durations) if true_durations else None
    return model.synthesize(list(utterance.units), durations).numpy().astype(np.float32)


def duration_error(model: AnyVocoder, dev: Sequence[Utterance]) -> dict[str, float]:
    """How far predicted durations are from the truth: mean |error| per unit and total length ratio."""
    abs_error = units = 0
    predicted_frames = true_frames = 0
    model.eval()
    with torch.no_grad():
        for utt in dev:
            predicted = model.predict_durations(torch.tensor([utt.units]))[0]
            truth = torch.tensor(utt.durations)
            abs_error += int((predicted - truth).abs().sum())
            units += len(utt.units)
            predicted_frames += int(predicted.sum())
            true_frames += int(truth.sum())
    return {
        "duration_abs_error": abs_error / max(1, units),
        "duration_length_ratio": predicted_frames / max(1, true_frames),
    }


def judge_dev(
    model: AnyVocoder, dev: Sequence[Utterance], facts_dir: Path, threads: int, samples_dir: Path | None, samples: int
) -> dict[str, Any]:
    """The judge's share of dev answers whose key words it hears: original recordings, and
    resyntheses with true and with predicted durations (plus what it heard when it missed)."""
    from training.judge import Judge, has_key_words
    from training.text_data import load_facts

    facts = {fact.id: fact for fact in load_facts(facts_dir)}
    judge = Judge(cpu_threads=threads)
    heard = {"original": 0, "resynth_true": 0, "resynth_predicted": 0}
    misses: dict[str, list[dict[str, str]]] = {name: [] for name in heard}
    for index, utt in enumerate(dev):
        versions = {
            "original": read_wav(utt.source) if utt.source else utt.audio,
            "resynth_true": resynthesize(model, utt, true_durations=True),
            "resynth_predicted": resynthesize(model, utt, true_durations=False),
        }
        for name, audio in versions.items():
            transcript = judge.transcribe(audio)
            if has_key_words(transcript, facts[utt.fact_id].key):
                heard[name] += 1
            else:
                misses[name].append({"id": utt.id, "heard": transcript})
            if samples_dir is not None and index < samples and name != "original":
                write_wav(samples_dir / f"{utt.id}.{name}.wav", audio)
    count = max(1, len(dev))
    shares = {f"judge_{name}": heard[name] / count for name in heard}
    original = shares["judge_original"]
    for name in ("resynth_true", "resynth_predicted"):
        shares[f"judge_{name}_vs_original"] = shares[f"judge_{name}"] / original if original else 0.0
    return {**shares, "judged_answers": len(dev), "judge_misses": misses}


# --- the stage ---------------------------------------------------------------------------


def run(ctx: StageContext) -> dict[str, Any]:
    """The `vocoder` stage; settings: see VocoderSettings."""
    settings = VocoderSettings.from_mapping(ctx.settings)
    if settings.threads:  # run_stage restores the thread count afterwards
        torch.set_num_threads(settings.threads)
    return _run(ctx, settings)


def _run(ctx: StageContext, settings: VocoderSettings) -> dict[str, Any]:
    torch.manual_seed(ctx.seed)
    units_dir = ctx.input("units")
    num_units = int(json.loads((units_dir / "units.json").read_text())["num_units"])
    config = vocoder_config(settings, num_units)
    model = build_vocoder(config)
    if settings.init_from_centroids:
        init_unit_embeddings(model, UnitExtractor.load(units_dir).centroids)
    data = load_utterances(ctx.input("synth"), units_dir, config.hop_length)
    train = [u for u in data if u.split == "train"]
    dev = [u for u in data if u.split == "dev"]
    texts, voice = agent_texts(ctx, settings) if settings.questions or settings.answer_variants else ([], {})
    if texts:
        ctx.reporter.log(f"vocoder: rendering {len(texts)} more agent-voice texts (questions, answer variants)")
        train += rendered_utterances(texts, units_dir, voice, config.hop_length)
    ear = EncoderFeatureLoss(load_speech_encoder(ctx.input("asr"))) if settings.encoder_feature_weight else None
    started = time.perf_counter()
    result = train_vocoder(ctx, model, train, settings, ear)
    duration_fit = fit_durations(ctx, model, train, settings)
    train_seconds = time.perf_counter() - started
    save_part(ctx.out, PART_NAME, model, config)
    summary: dict[str, Any] = {
        "architecture": settings.architecture,
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_utterances": len(train),
        "train_hours": round(sum(u.audio.size for u in train) / config.sample_rate / 3600, 3),
        **{f"final_{k}": round(v, 4) for k, v in result.losses.items()},
        "duration_fit_steps": settings.duration_steps,
        "final_duration_fit": None if duration_fit is None else round(duration_fit, 4),
    }
    if dev:
        summary.update({k: round(v, 4) for k, v in duration_error(model, dev).items()})
    figures: dict[str, Any] = {}
    if settings.judge and dev and ctx.facts is not None:
        ctx.reporter.log(f"vocoder: judging {len(dev[: settings.judge_limit])} dev answers")
        started = time.perf_counter()
        judged = dev[: settings.judge_limit]
        figures = judge_dev(model, judged, ctx.facts, settings.threads or 2, ctx.out / SAMPLES_DIR, settings.samples)
        summary["judge_seconds"] = round(time.perf_counter() - started, 1)
        shares = {k: v for k, v in figures.items() if k != "judge_misses"}
        summary.update({k: round(v, 4) if isinstance(v, float) else v for k, v in shares.items()})
    metrics = MetricsLog(ctx.out)
    metrics.set(summary=summary, **({"judge_misses": figures["judge_misses"]} if figures else {}))
    metrics.save()
    return summary
