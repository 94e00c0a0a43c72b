"""Stage `asr`: the speech encoder learns to listen, as the encoder of a tiny Whisper ASR model.

The tiny preset's Whisper encoder, a small Whisper decoder over the run's text tokenizer and a
CTC head on the 50 Hz encoder states are trained together on the synthesized questions and agent
answers (train splits): cross-entropy of the decoder on the transcript plus `ctc_weight` × CTC.
The CTC term asks every stretch of states to carry its own sounds, which is what the later
listening stages read (the adapter and its CTC head work on the trimmed states, no decoder). Its
labels are characters by default: with a few thousand clips they are learned far sooner than the
tokenizer's 512 word pieces (dev CER 0.24 vs 0.43 after 350 steps), and rare names share them.

Features are exactly inference's (`SpeechEncoder.log_mel`: a full window of log-mel frames).
Each clip is augmented at training time (training/augment.py: gain, speed, silence, phone band, noise) before its
features are taken; SpecAugment masks on the features are a setting, off (they slowed this
underfit model's learning: README). For speed the encoder runs on the window's first frames only, enough for
the batch's longest clip plus `window_margin_s` of padding: the window's sinusoidal positions are
a prefix of the full window's, so the weights are the same, and the states of the audio come out
as good from the full 10 s window (measured: dev CER equal within 0.01 either way).

The learning rate warms up, then follows a cosine whose progress is the larger of steps done /
`steps` and wall time / `max_minutes`: on a busy machine the stage ends on time, fully decayed.
At the end, dev-voice questions are greedy-decoded from full-window features (as inference
encodes them) for CER/WER; the CTC head's greedy CER is reported beside it.

With `import: PATH` (a local Hugging Face Whisper folder: config.json + model.safetensors or
shards; a relative PATH lies under the data root) it trains nothing: that Whisper's encoder
becomes the stage's output.

Output (RUN/asr/): speech_encoder.safetensors + speech_encoder.json (save_part of a SpeechEncoder
whose `.whisper` is the trained encoder), and when trained metrics.json, loss.png, checkpoint/ (resume).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from echox.audio import SAMPLE_RATE, read_wav
from echox.checkpoint import save_part
from echox.convert.files import load_safetensors, read_json, safetensors_files
from echox.convert.official import encoder_config_from_whisper, whisper_encoder_tensors
from echox.errors import ConfigError, ModelLoadError
from echox.models.presets import get_preset
from echox.models.speech_adapter import ctc_greedy_ids
from echox.models.speech_encoder import SAMPLES_PER_STATE, SpeechEncoder, SpeechEncoderConfig
from echox.tokenizer import TextTokenizer
from training.augment import AugmentSettings, augment
from training.jsonl import read_jsonl
from training.stage import (
    MetricsLog,
    StageContext,
    load_training_state,
    optimizer_step,
    save_training_state,
    schedule_progress,
    set_learning_rate,
    settings_kwargs,
    warmup_cosine,
)
from training.stages.lm import epoch_batches, import_folder, import_setting, load_lm_tokenizer, load_weights
from training.stages.synth import ANSWERS_MANIFEST, QUESTIONS_MANIFEST

PART_NAME = "speech_encoder"
CHECKPOINT_DIR = "checkpoint"
IGNORE_INDEX = -100
MANIFESTS = {"question": QUESTIONS_MANIFEST, "answer": ANSWERS_MANIFEST}  # synth's, by clip kind
STATES_PER_SECOND = SAMPLE_RATE // SAMPLES_PER_STATE
CTC_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789'"  # CTC labels 1.. of normalized text; 0 is blank
CTC_UNITS = ("chars", "tokens")


@dataclasses.dataclass(frozen=True)
class ASRSettings:
    """`settings.asr` of a recipe. Unknown keys are an error."""

    # The model is underfit, not short of voices: at 1,400 steps it hears train-voice questions
    # as badly as dev-voice ones (WER 0.250 and 0.257); 2,000 steps gave dev WER 0.196 and 0.175
    # in two runs. About 14 minutes on session 13's 2-core box.
    steps: int = 2000
    # A safety stop, not the budget: stage I depends on the asr finishing its steps (the same run
    # with 886 of 1,400, cut at 7.5 minutes: stage-I dev S2T 0.555; with all 1,400: 0.795). Setup
    # and evaluation take ~30 s more.
    max_minutes: float = 16.0
    batch_size: int = 16  # small batches, more updates: within the budget that learns sooner
    lr: float = 5e-3
    min_lr_ratio: float = 0.05
    warmup: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ctc_weight: float = 0.5
    ctc_units: str = "chars"  # CTC labels: normalized characters, or the text tokenizer's ids (blank = pad)
    decoder_layers: int = 2
    max_target_positions: int = 128
    dropout: float = 0.0
    window_margin_s: float = 0.5  # padding after the longest clip of a batch in a cropped window
    augment: dict[str, Any] = dataclasses.field(default_factory=dict)  # AugmentSettings fields
    # SpecAugment on the log-mel frames (0 masks: off): bands of up to freq_mask_bins mel bins and
    # stretches of up to time_mask_share of a clip's frames, set to the clip's mean.
    freq_masks: int = 0
    freq_mask_bins: int = 10
    time_masks: int = 0
    time_mask_share: float = 0.05
    answers: bool = True  # also train on the agent's train answers
    limit_clips: int = 0  # 0 = every train clip (tests use a handful)
    threads: int = 2
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    dev_clips: int = 300  # dev-voice questions decoded for the dev figures
    eval_batch_size: int = 32
    encoder_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # SpeechEncoderConfig fields
    import_dir: str = ""  # `import: PATH`: a local HF Whisper folder (relative: under the data root), not trained

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ASRSettings:
        settings = cls(**settings_kwargs(cls, import_setting(values), "settings.asr"))
        settings_kwargs(SpeechEncoderConfig, settings.encoder_overrides, "settings.asr.encoder_overrides")
        if settings.import_dir and settings.encoder_overrides:
            raise ConfigError("settings.asr: encoder_overrides shape an encoder trained here, not an imported one")
        if settings.ctc_units not in CTC_UNITS:
            raise ConfigError(f"settings.asr: ctc_units must be one of {CTC_UNITS}, got {settings.ctc_units!r}")
        AugmentSettings.from_mapping(settings.augment)  # fail now, not at the first batch
        masks = (settings.freq_masks, settings.freq_mask_bins, settings.time_masks)
        if min(masks) < 0 or not 0.0 <= settings.time_mask_share <= 1.0:
            raise ConfigError("settings.asr: mask counts and widths must be >= 0, time_mask_share in [0, 1]")
        return settings


@dataclasses.dataclass(frozen=True)
class Clip:
    """One transcribed recording of the synth stage."""

    path: Path
    text: str
    ids: tuple[int, ...]
    split: str
    seconds: float
    kind: str  # "question" | "answer"


class ASRModel(nn.Module):
    """The Whisper encoder-decoder plus a CTC head on the encoder states (labels: `ctc_units`)."""

    def __init__(self, config: WhisperConfig, ctc_units: str) -> None:
        super().__init__()
        self.whisper = WhisperForConditionalGeneration(config)
        self.ctc_units = ctc_units
        self.ctc_head = nn.Linear(config.d_model, 1 + len(CTC_CHARS) if ctc_units == "chars" else config.vocab_size)

    @property
    def encoder(self) -> WhisperEncoder:
        encoder: WhisperEncoder = self.whisper.model.encoder
        return encoder

    def decode_logits(self, decoder_ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, L, V] of the decoder reading `states` [B, T, d]."""
        hidden = self.whisper.model.decoder(input_ids=decoder_ids, encoder_hidden_states=states, use_cache=False)
        logits: torch.Tensor = self.whisper.proj_out(hidden.last_hidden_state)
        return logits


# --- data ----------------------------------------------------------------------------------------


def load_clips(synth: Path, tokenizer: TextTokenizer, answers: bool) -> list[Clip]:
    """Every question (and, with `answers`, every agent answer) of the synth manifests."""
    clips: list[Clip] = []
    for kind, manifest in list(MANIFESTS.items())[: 2 if answers else 1]:
        for row in read_jsonl(synth / manifest, "run the synth stage first"):
            text, split, seconds = str(row["text"]), str(row["split"]), float(row["seconds"])
            clips.append(Clip(synth / row["path"], text, tuple(tokenizer.encode(text)), split, seconds, kind))
    return clips


def dev_subset(clips: Sequence[Clip], count: int) -> list[Clip]:
    """`count` dev clips spread evenly over the dev list (all voices and facts)."""
    if count <= 0 or not clips:
        return []
    stride = max(1, len(clips) // count)
    return list(clips[::stride][:count])


class BatchSchedule:
    """The clip indices of any step (length-bucketed, reshuffled every epoch), so a resumed run
    sees exactly the batches it would have seen."""

    def __init__(self, clips: Sequence[Clip], batch_size: int, seed: int) -> None:
        self.lengths = [int(c.seconds * 100) for c in clips]
        self.batch_size, self.seed = batch_size, seed
        self._epoch, self._batches = 0, epoch_batches(self.lengths, batch_size, seed, 0)

    def indices(self, step: int) -> list[int]:
        epoch = step // len(self._batches)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.lengths, self.batch_size, self.seed, epoch)
        return self._batches[step % len(self._batches)]


@dataclasses.dataclass(frozen=True)
class Batch:
    features: torch.Tensor  # [B, mels, 2 * window] log-mel frames (the window's first frames)
    states: list[int]  # encoder states that cover each clip's audio
    decoder_ids: torch.Tensor  # [B, L] bos + transcript (pad after)
    labels: torch.Tensor  # [B, L] transcript + eos (IGNORE_INDEX after)
    ctc_targets: torch.Tensor  # [sum of lengths] every clip's CTC labels, one after another
    ctc_lengths: list[int]


def ctc_blank(units: str, tokenizer: TextTokenizer) -> int:
    return 0 if units == "chars" else tokenizer.pad_id


def ctc_labels(clip: Clip, units: str) -> list[int]:
    """A clip's CTC labels: its normalized characters (1-based in CTC_CHARS) or its token ids."""
    if units == "tokens":
        return list(clip.ids)
    return [1 + CTC_CHARS.index(ch) for ch in normalize(clip.text)]


def ctc_text(labels: Sequence[int], units: str, tokenizer: TextTokenizer) -> str:
    if units == "tokens":
        return tokenizer.decode(labels)
    return "".join(CTC_CHARS[label - 1] for label in labels)


def window_log_mel(encoder: SpeechEncoder, audios: Sequence[np.ndarray], window: int) -> torch.Tensor:
    """`encoder.log_mel(audio)[:, :, : 2 * window]` for each audio, computed on the window alone (3x
    faster). The frames are identical while every audio ends a state or more before the window's end:
    the padding the window drops is silence, which neither the STFT nor the level floor sees."""
    if window >= encoder.config.max_source_positions:
        return torch.cat([encoder.log_mel(audio) for audio in audios])
    if max(audio.size for audio in audios) > (window - 1) * SAMPLES_PER_STATE:
        raise ValueError(f"a clip does not end a state before the {window}-state window's end")
    extractor = copy.copy(encoder.features)  # shares the mel filters; only the window differs
    extractor.n_samples, extractor.nb_max_frames = window * SAMPLES_PER_STATE, 2 * window
    # One call for the batch: the extractor pads every audio to the window and takes each one's
    # own level floor, as one call per audio does, at a fraction of the per-call overhead.
    batch = [np.asarray(audio, dtype=np.float32) for audio in audios]
    frames = extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    return frames.to(encoder.whisper.conv1.weight.dtype)


def make_batch(
    clips: Sequence[Clip],
    audios: Sequence[np.ndarray],
    encoder: SpeechEncoder,
    tokenizer: TextTokenizer,
    window: int,
    ctc_units: str,
) -> Batch:
    """Inference's features of each audio cut to `window` states' frames, and the text targets."""
    features = window_log_mel(encoder, audios, window)
    states = [min(window, encoder.num_states(audio.size)) for audio in audios]
    width = 1 + max(len(c.ids) for c in clips)
    decoder_ids = torch.full((len(clips), width), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(clips), width), IGNORE_INDEX, dtype=torch.long)
    for row, clip in enumerate(clips):
        decoder_ids[row, : 1 + len(clip.ids)] = torch.tensor([tokenizer.bos_id, *clip.ids])
        labels[row, : 1 + len(clip.ids)] = torch.tensor([*clip.ids, tokenizer.eos_id])
    ctc = [ctc_labels(clip, ctc_units) for clip in clips]
    ctc_targets = torch.tensor([label for row in ctc for label in row], dtype=torch.long)
    return Batch(features, states, decoder_ids, labels, ctc_targets, [len(row) for row in ctc])


def training_batch(
    clips: Sequence[Clip],
    encoder: SpeechEncoder,
    tokenizer: TextTokenizer,
    settings: ASRSettings,
    augment_settings: AugmentSettings,
    rng: np.random.Generator,
) -> Batch:
    """Augmented clips in a window cropped to the longest one plus `window_margin_s` of padding."""
    limit = encoder.config.max_source_positions
    window_samples = limit * SAMPLES_PER_STATE
    audios = [augment(read_wav(c.path), rng, augment_settings)[:window_samples] for c in clips]
    longest = max(encoder.num_states(a.size) for a in audios)
    window = min(limit, longest + max(1, round(settings.window_margin_s * STATES_PER_SECOND)))
    batch = make_batch(clips, audios, encoder, tokenizer, window, settings.ctc_units)
    for features, states in zip(batch.features, batch.states, strict=True):
        mask_spectrogram(features[:, : 2 * states], settings, rng)
    return batch


def mask_spectrogram(features: torch.Tensor, settings: ASRSettings, rng: np.random.Generator) -> None:
    """SpecAugment, in place, on one clip's log-mel frames [mels, frames]: `freq_masks` bands of
    0..freq_mask_bins bins and `time_masks` stretches of 0..time_mask_share of the frames, each
    set to the clip's mean. No masks, no draws: the batch is as it was without the setting."""
    if not (settings.freq_masks or settings.time_masks):
        return
    mean = float(features.mean())
    bins, frames = features.shape
    for _ in range(settings.freq_masks):
        width = int(rng.integers(0, min(settings.freq_mask_bins, bins) + 1))
        start = int(rng.integers(0, bins - width + 1))
        features[start : start + width] = mean
    longest = int(settings.time_mask_share * frames)
    for _ in range(settings.time_masks):
        width = int(rng.integers(0, longest + 1))
        start = int(rng.integers(0, frames - width + 1))
        features[:, start : start + width] = mean


# --- the model ------------------------------------------------------------------------------------


def whisper_config(encoder: SpeechEncoderConfig, tokenizer: TextTokenizer, settings: ASRSettings) -> WhisperConfig:
    """The encoder's own Whisper config with a small decoder over the run's text vocabulary."""
    config = encoder.to_hf()
    config.vocab_size = tokenizer.vocab_size
    config.decoder_layers = settings.decoder_layers
    config.max_target_positions = settings.max_target_positions
    config.pad_token_id = tokenizer.pad_id
    config.bos_token_id = config.decoder_start_token_id = tokenizer.bos_id
    config.eos_token_id = tokenizer.eos_id
    config.dropout = settings.dropout
    return config


def layer_states(encoder: WhisperEncoder, features: torch.Tensor, layers: int = 0) -> list[torch.Tensor]:
    """The states after each of the first `layers` layers (0 = all; no final norm) for the first
    frames of the window: [B, mels, 2T] → a list of [B, T, d]."""
    hidden = F.gelu(encoder.conv1(features))
    hidden = F.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    hidden = F.dropout(hidden, p=encoder.dropout, training=encoder.training)
    depth = len(encoder.layers) if layers <= 0 else min(layers, len(encoder.layers))
    states = []
    for layer in encoder.layers[:depth]:
        hidden = layer(hidden, None)
        states.append(hidden)
    return states


def encode_window(encoder: WhisperEncoder, features: torch.Tensor, layers: int = 0) -> torch.Tensor:
    """WhisperEncoder.forward on the first frames of its window: [B, mels, 2T] → [B, T, d].
    Identical to the HF forward when given the whole window (tests check it). With `layers` < the
    encoder's depth, the states after that many layers (no final norm; 0 = all)."""
    states = layer_states(encoder, features, layers)
    if len(states) < len(encoder.layers):
        return states[-1]
    normed: torch.Tensor = encoder.layer_norm(states[-1])
    return normed


def batch_loss(
    model: ASRModel, batch: Batch, blank_id: int, ctc_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoder cross-entropy (+ ctc_weight × CTC); the decoder reads the states up to the longest clip."""
    states = encode_window(model.encoder, batch.features)
    logits = model.decode_logits(batch.decoder_ids, states[:, : max(batch.states)])
    ce = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
    scored = batch.labels != IGNORE_INDEX
    accuracy = float(((logits.argmax(-1) == batch.labels) & scored).sum()) / max(1, int(scored.sum()))
    figures = {"ce": ce.item(), "token_accuracy": accuracy}
    if ctc_weight <= 0:
        return ce, figures
    log_probs = F.log_softmax(model.ctc_head(states).float(), dim=-1).transpose(0, 1)
    lengths = (torch.tensor(batch.states), torch.tensor(batch.ctc_lengths))
    ctc = F.ctc_loss(log_probs, batch.ctc_targets, *lengths, blank=blank_id, zero_infinity=True)
    figures["ctc"] = ctc.item()
    return ce + ctc_weight * ctc, figures


# --- evaluation -----------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower case, words and apostrophes only: punctuation and spacing do not count as errors."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        current = [i]
        for j, hyp in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus CER and WER of normalized texts, and the share transcribed exactly."""
    refs, hyps = [normalize(r) for r in references], [normalize(h) for h in hypotheses]
    chars = sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True))
    words = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps, strict=True))
    return {
        "cer": chars / max(1, sum(len(r) for r in refs)),
        "wer": words / max(1, sum(len(r.split()) for r in refs)),
        "exact": sum(r == h for r, h in zip(refs, hyps, strict=True)) / max(1, len(refs)),
    }


def export_encoder(model: ASRModel, config: SpeechEncoderConfig) -> SpeechEncoder:
    """The inference module (SpeechEncoder) holding the trained encoder weights."""
    encoder = SpeechEncoder(config)
    encoder.whisper.load_state_dict(model.encoder.state_dict())
    return encoder.eval()


@torch.no_grad()
def greedy_decode(model: ASRModel, states: torch.Tensor, tokenizer: TextTokenizer, max_tokens: int) -> list[list[int]]:
    """Greedy transcripts of a batch of encoder states [B, T, d], each up to its eos."""
    ids = torch.full((states.shape[0], 1), tokenizer.bos_id, dtype=torch.long)
    finished = torch.zeros(states.shape[0], dtype=torch.bool)
    for _ in range(max_tokens):
        next_ids = model.decode_logits(ids, states)[:, -1].argmax(-1)
        next_ids[finished] = tokenizer.pad_id
        finished |= next_ids == tokenizer.eos_id
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if bool(finished.all()):
            break
    specials = {tokenizer.pad_id, tokenizer.eos_id}
    return [[t for t in row[1:] if t not in specials] for row in ids.tolist()]


@torch.no_grad()
def evaluate(
    model: ASRModel, encoder_config: SpeechEncoderConfig, tokenizer: TextTokenizer, clips: Sequence[Clip], batch: int
) -> dict[str, Any]:
    """Decoder and CTC error rates on `clips`, encoded exactly as inference does (log_mel of the
    whole window, SpeechEncoder forward, states trimmed to the audio)."""
    encoder = export_encoder(model, encoder_config)
    was_training = model.training
    model.eval()
    decoded, ctc_decoded = [], []
    for start in range(0, len(clips), batch):
        chunk = clips[start : start + batch]
        audios = [read_wav(c.path) for c in chunk]
        states = encoder(torch.cat([encoder.log_mel(a) for a in audios]))
        lengths = [encoder.num_states(a.size) for a in audios]
        max_tokens = min(model.whisper.config.max_target_positions - 1, 2 * max(len(c.ids) for c in chunk) + 4)
        for ids in greedy_decode(model, states[:, : max(lengths)], tokenizer, max_tokens):
            decoded.append(tokenizer.decode(ids))
        for row, length in enumerate(lengths):
            ctc_ids = ctc_greedy_ids(model.ctc_head(states[row, :length]), ctc_blank(model.ctc_units, tokenizer))
            ctc_decoded.append(ctc_text(ctc_ids, model.ctc_units, tokenizer))
    model.train(was_training)
    texts = [c.text for c in clips]
    wrong = [{"text": t, "heard": d} for t, d in zip(texts, decoded, strict=True) if normalize(t) != normalize(d)]
    return {
        **error_rates(texts, decoded),
        "ctc": error_rates(texts, ctc_decoded),
        "clips": len(clips),
        "wrong": wrong[:15],
    }


# --- training -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
    """The training loop's state: model, optimizer, data and where it writes."""

    ctx: StageContext
    settings: ASRSettings
    model: ASRModel
    encoder_config: SpeechEncoderConfig
    tokenizer: TextTokenizer
    train: Sequence[Clip]
    dev: Sequence[Clip]

    def __post_init__(self) -> None:
        self.speech_encoder = SpeechEncoder(self.encoder_config)  # features only (log_mel, num_states)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay
        )
        self.augment = AugmentSettings.from_mapping(self.settings.augment)
        self.schedule = BatchSchedule(self.train, self.settings.batch_size, self.ctx.seed)
        self.metrics = MetricsLog(self.ctx.out)

    def step(self, step: int, lr: float) -> dict[str, float]:
        rng = np.random.default_rng([self.ctx.seed, step])  # the same augmentation after a resume
        clips = [self.train[i] for i in self.schedule.indices(step)]
        batch = training_batch(clips, self.speech_encoder, self.tokenizer, self.settings, self.augment, rng)
        set_learning_rate(self.optimizer, lr)
        blank = ctc_blank(self.settings.ctc_units, self.tokenizer)
        loss, figures = batch_loss(self.model, batch, blank, self.settings.ctc_weight)
        optimizer_step(self.optimizer, loss, self.model.parameters(), self.settings.grad_clip)
        return {"loss": loss.item(), **figures}

    def evaluate(self) -> dict[str, Any]:
        return evaluate(self.model, self.encoder_config, self.tokenizer, self.dev, self.settings.eval_batch_size)

    def run(self) -> dict[str, Any]:
        """Trains from the last checkpoint (RUN/asr/checkpoint) until the schedule ends."""
        settings, checkpoint = self.settings, self.ctx.out / CHECKPOINT_DIR
        step, extra = load_training_state(checkpoint, self.model, self.optimizer)
        elapsed_before = float(extra.get("elapsed_s", 0.0))
        for name in self.metrics.curves:  # points after the checkpoint will be logged again
            self.metrics.curves[name] = [p for p in self.metrics.curves[name] if p[0] <= step]
        self.ctx.reporter.start("asr", settings.steps, "steps")
        self.ctx.reporter.advance(step)
        if step:
            self.ctx.reporter.log(f"asr: resuming at step {step}")
        started, elapsed = time.perf_counter(), elapsed_before
        progress, window = schedule_progress(step, settings.steps, elapsed, settings.max_minutes), []
        self.model.train()
        while progress < 1.0:
            self.ctx.check_cancelled()
            factor = warmup_cosine(step, settings.warmup, progress, settings.min_lr_ratio)
            figures = self.step(step, settings.lr * factor)
            step += 1
            elapsed = elapsed_before + time.perf_counter() - started
            progress = schedule_progress(step, settings.steps, elapsed, settings.max_minutes)
            window.append(figures)
            if step % settings.log_every == 0 or progress >= 1.0:
                self.metrics.add(step, **{k: float(np.mean([w[k] for w in window])) for k in window[0]})
                window.clear()
            if settings.eval_every and step % settings.eval_every == 0 and progress < 1.0:
                result = self.evaluate()
                self.metrics.add(step, dev_cer=result["cer"], dev_ctc_cer=result["ctc"]["cer"])
            self.ctx.reporter.advance(1, loss=figures["loss"], lr=self.optimizer.param_groups[0]["lr"])
            if step % settings.checkpoint_every == 0 or progress >= 1.0:
                save_training_state(checkpoint, self.model, self.optimizer, step, {"elapsed_s": elapsed})
                self.metrics.save()
        return {"steps_done": step, "train_seconds": round(elapsed, 1), "stopped_by_time": step < settings.steps}


def import_encoder(ctx: StageContext, folder: Path) -> dict[str, Any]:
    """The `import` path: the HF Whisper folder's encoder as this stage's output, nothing trained."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"settings.asr.import: {folder} is not a HF Whisper folder: config.json is missing")
    cfg = read_json(folder / "config.json")
    tensors = whisper_encoder_tensors(load_safetensors(safetensors_files(folder, "Whisper")))
    try:
        config = encoder_config_from_whisper(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {reason}") from None
    # Our stages keep the preset's trimming (the release alone encodes the whole padded window).
    config = config.replace(trim_to_audio=get_preset(ctx.preset).encoder.trim_to_audio)
    with torch.device("meta"):  # the loaded tensors become the weights: no random init, no copy
        encoder = SpeechEncoder(config)
    load_weights(encoder.whisper, tensors, folder)
    save_part(ctx.out, PART_NAME, encoder, config)
    ctx.reporter.log(f"asr: imported the Whisper encoder of {folder}")
    return {
        "imported": str(folder),
        "encoder_parameters": sum(p.numel() for p in encoder.whisper.parameters()),
        "d_model": config.d_model,
        "layers": config.num_layers,
    }


def run(ctx: StageContext) -> dict[str, Any]:
    settings = ASRSettings.from_mapping(ctx.settings)
    torch.set_num_threads(settings.threads)
    if settings.import_dir:
        folder = import_folder(settings.import_dir)
        if not folder.is_dir():
            raise ModelLoadError(f"settings.asr.import: no HF Whisper folder at {folder}")
        return import_encoder(ctx, folder)
    tokenizer = load_lm_tokenizer(ctx.input("lm"))
    clips = load_clips(ctx.input("synth"), tokenizer, settings.answers)
    train = [c for c in clips if c.split == "train"]
    if settings.limit_clips:
        train = train[:: max(1, len(train) // settings.limit_clips)][: settings.limit_clips]
    dev = dev_subset([c for c in clips if c.split == "dev" and c.kind == "question"], settings.dev_clips)
    encoder_config: SpeechEncoderConfig = get_preset(ctx.preset).encoder.replace(**settings.encoder_overrides)
    torch.manual_seed(ctx.seed)
    model = ASRModel(whisper_config(encoder_config, tokenizer, settings), settings.ctc_units)
    ctx.reporter.log(f"asr: {len(train)} train clips, {len(dev)} dev clips, vocabulary {tokenizer.vocab_size}")
    trainer = Trainer(ctx, settings, model, encoder_config, tokenizer, train, dev)
    trained = trainer.run()
    started = time.perf_counter()
    result = trainer.evaluate() if dev else {}
    save_part(ctx.out, PART_NAME, export_encoder(model, encoder_config), encoder_config)
    trainer.metrics.set(dev=result, eval_seconds=round(time.perf_counter() - started, 1))
    trainer.metrics.save()
    return {
        **trained,
        "train_clips": len(train),
        "encoder_parameters": sum(p.numel() for p in model.encoder.parameters()),
        "dev_cer": result.get("cer"),
        "dev_wer": result.get("wer"),
        "dev_exact": result.get("exact"),
        "dev_ctc_cer": result.get("ctc", {}).get("cer"),
    }
