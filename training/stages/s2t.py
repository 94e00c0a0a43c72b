"""Stage `s2t` (stage I of the method): a spoken question → the text answer.

It starts from the run's assembled parts (`training.assemble.assemble_parts`: the `lm` stage's
LLM and tokenizer, the `asr` stage's speech encoder when that stage finished, else a random one)
and trains the speech adapter, the CTC head, LookBack and the LLM (full fine-tuning for tiny;
`lora_rank` > 0 trains peft LoRA adapters instead, merged into the weights at the end) with

    loss = CE(answer tokens) + ctc_weight · CTC(CTC-head logits, transcript tokens; blank = <audio_patch>)

The speech encoder stays frozen, so its states are computed once per clip rendition (clean, or
augmented with `training.augment`) and cached (`training.listen_data`). Every utterance then
goes through the adapter, CTC shrink, LookBack and the splice into the inference prompt one by
one, exactly as `EchoXModel.encode_speech` and `SpeechLLMStage.run` do it; only the LLM runs on
a padded batch. The learning rate warms up, then follows a cosine whose progress is the larger
of steps done / `steps` and training time / `max_minutes`, so a busy machine ends the stage on
time with a decayed rate. The new modules learn at `lr`, the pretrained LLM at `llm_lr`.

The dev figure is S2T accuracy: the share of a fixed sample of dev-voice questions whose greedy
answer, decoded by the streaming code itself (`SpeechLLMStage`), contains the fact's key words.

Outputs (RUN/s2t/): model/ (the whole EchoX, `EchoX.save_pretrained`), metrics.json, loss.png,
encoded/ (the cached encoder states, reusable by a later stage with the same encoder) and
checkpoint/ (resume state).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from echox.audio import read_wav
from echox.checkpoint import EchoX
from echox.errors import ConfigError
from echox.events import TranscriptEvent
from echox.models.echox import EchoXModel
from echox.streaming.stages import AnswerEnd, SpeechLLMStage
from echox.tokenizer import Turn
from training.assemble import ENCODER_STAGE, assemble_parts
from training.augment import AugmentSettings
from training.judge import has_key_words, normalize
from training.listen_data import (
    Rendition,
    SpokenBatch,
    SpokenExample,
    SpokenQuestion,
    batch_indices,
    build_examples,
    collate,
    encode_shared,
    load_spoken_questions,
    plan_renditions,
    sample_clips,
)
from training.stage import (
    DONE_FILE,
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
from training.text_data import IGNORE_INDEX, load_facts

CHECKPOINT_DIR = "checkpoint"
ENCODED_DIR = "encoded"
MODEL_DIR = "model"
TRAINED_MODULES = ("speech_adapter", "ctc_head", "lookback", "llm")
NEW_MODULES = ("speech_adapter", "ctc_head", "lookback")  # learn at `lr`; the LLM at `llm_lr`


@dataclasses.dataclass(frozen=True)
class S2TSettings:
    """`settings.s2t` of a recipe. Unknown keys are an error."""

    steps: int = 1200
    batch_size: int = 24
    lr: float = 2e-3  # adapter, CTC head and LookBack (new)
    llm_lr: float = 3e-4  # the pretrained LLM
    llm_frozen_share: float = 0.0  # share of training (by progress) before the LLM starts learning
    freeze_embeddings: bool = True  # the LLM's (tied) token table stays as the T2C learned to read it
    lora_rank: int = 0  # > 0: LoRA (peft) on the LLM instead of full fine-tuning (the large presets)
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ctc_head_from_embeddings: bool = True  # start the CTC head as the token table (see init_ctc_head)
    min_lr_ratio: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ctc_weight: float = 0.3
    clean_per_text: int = 6  # clean train clips per question text, spread over the train voices
    augmented_per_text: int = 2  # augmented renditions per question text
    augment: dict[str, Any] = dataclasses.field(default_factory=dict)  # AugmentSettings fields
    history_share: float = 0.0  # share of examples with an earlier text turn before the spoken one
    max_minutes: float = 8.0  # training-loop time cap (encoding and evaluation come on top)
    threads: int = 1
    encode_batch: int = 8
    dev_clips: int = 200  # dev-voice questions in the final greedy S2T accuracy
    monitor_clips: int = 48  # dev-voice clips of the teacher-forced dev loss during training
    eval_every: int = 200
    checkpoint_every: int = 200
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.clean_per_text + self.augmented_per_text < 1:
            raise ConfigError("settings.s2t: clean_per_text + augmented_per_text must be at least 1")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> S2TSettings:
        kwargs = settings_kwargs(cls, values, "settings.s2t")
        if "lora_targets" in kwargs:
            kwargs["lora_targets"] = tuple(kwargs["lora_targets"])
        settings = cls(**kwargs)
        AugmentSettings.from_mapping(settings.augment)  # fails early on a bad augment mapping
        return settings

    @property
    def augment_settings(self) -> AugmentSettings:
        return AugmentSettings.from_mapping(self.augment)


# --- the forward pass and the loss ---------------------------------------------------------


@dataclasses.dataclass
class SpokenForward:
    """What the model computes for a batch of spoken turns (right-padded to the longest)."""

    hidden: torch.Tensor  # [B, L, H] the LLM's last hidden states (after its final norm)
    logits: torch.Tensor  # [B, L, V]
    labels: torch.Tensor  # [B, L] answer ids + end marker; IGNORE_INDEX on prompt, speech and pads
    attention_mask: torch.Tensor  # [B, L]
    ctc_loss: torch.Tensor  # mean CTC of the CTC head against the transcripts
    kept: list[int]  # frames each utterance kept after CTC shrink


def splice_labels(input_ids: torch.Tensor, labels: torch.Tensor, patch_id: int, lengths: Sequence[int]) -> torch.Tensor:
    """`labels` with the k-th `<audio_patch>` position widened to `lengths[k]` IGNORE_INDEX
    positions, matching `EchoXModel.splice` of the same ids."""
    positions = (input_ids == patch_id).nonzero().flatten().tolist()
    pieces, cursor = [], 0
    for position, length in zip(positions, lengths, strict=True):
        pieces += [labels[cursor:position], labels.new_full((length,), IGNORE_INDEX)]
        cursor = position + 1
    pieces.append(labels[cursor:])
    return torch.cat(pieces)


def ctc_loss(logits: Sequence[torch.Tensor], transcripts: Sequence[torch.Tensor], blank_id: int) -> torch.Tensor:
    """Mean CTC (per target token, as torch's 'mean') of per-utterance CTC logits [T_i, V]."""
    width = max(len(item) for item in logits)
    padded = logits[0].new_zeros((width, len(logits), logits[0].shape[-1]))
    for column, item in enumerate(logits):
        padded[: len(item), column] = item
    log_probs = padded.float().log_softmax(-1)
    return F.ctc_loss(
        log_probs,
        torch.cat(list(transcripts)),
        input_lengths=torch.tensor([len(item) for item in logits]),
        target_lengths=torch.tensor([len(t) for t in transcripts]),
        blank=blank_id,
        zero_infinity=True,  # an utterance too short for its transcript adds nothing, not inf
    )


def forward_spoken(model: EchoXModel, batch: SpokenBatch, patch_id: int) -> SpokenForward:
    """Adapter, CTC shrink + LookBack and splice per utterance (as inference does), then the LLM
    on the padded batch. Gradients reach the adapter, CTC head, LookBack and LLM."""
    dtype = model.speech_adapter.projector.weight.dtype
    embeds, labels, ctc_logits, kept = [], [], [], []
    for states, ids, item_labels in zip(batch.states, batch.input_ids, batch.labels, strict=True):
        adapted, logits = model.adapt(states.to(model.device, dtype).unsqueeze(0))
        _, shrunk = model.shrink(adapted, logits)
        ids = ids.to(model.device)
        embeds.append(model.splice(ids, patch_id, shrunk))
        labels.append(splice_labels(ids, item_labels.to(model.device), patch_id, [len(shrunk[0])]))
        ctc_logits.append(logits[0])
        kept.append(len(shrunk[0]))
    width = max(len(e) for e in embeds)
    inputs = embeds[0].new_zeros((len(embeds), width, embeds[0].shape[-1]))
    padded_labels = torch.full((len(embeds), width), IGNORE_INDEX, dtype=torch.long, device=model.device)
    mask = torch.zeros((len(embeds), width), dtype=torch.long, device=model.device)
    for row, (item, item_labels) in enumerate(zip(embeds, labels, strict=True)):
        inputs[row, : len(item)] = item
        padded_labels[row, : len(item)] = item_labels
        mask[row, : len(item)] = 1
    # The decoder and head separately, as SpeechLLMStage.decode runs them.
    hidden = model.llm.get_decoder()(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    logits = model.llm.get_output_embeddings()(hidden)
    transcripts = [t.to(model.device) for t in batch.transcripts]
    return SpokenForward(hidden, logits, padded_labels, mask, ctc_loss(ctc_logits, transcripts, patch_id), kept)


def answer_ce(forward: SpokenForward) -> tuple[torch.Tensor, float]:
    """Mean CE of the next-token predictions on labelled positions, and their argmax accuracy."""
    logits, targets = forward.logits[:, :-1], forward.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    hits = (logits.argmax(-1) == targets) & scored
    return loss, float(hits.sum()) / max(1, int(scored.sum()))


@dataclasses.dataclass(frozen=True)
class StepFigures:
    loss: float
    answer_ce: float
    ctc: float
    answer_token_accuracy: float
    kept_per_token: float  # frames kept after shrink per transcript token (about 1-2 once CTC works)


def s2t_loss(
    model: EchoXModel, batch: SpokenBatch, patch_id: int, ctc_weight: float
) -> tuple[torch.Tensor, StepFigures]:
    """The stage-I loss of a batch: CE on the answers + ctc_weight · CTC on the transcripts."""
    forward = forward_spoken(model, batch, patch_id)
    ce, accuracy = answer_ce(forward)
    loss = ce + ctc_weight * forward.ctc_loss
    tokens = sum(len(t) for t in batch.transcripts)
    figures = StepFigures(
        float(loss.detach()), float(ce.detach()), float(forward.ctc_loss.detach()), accuracy,
        sum(forward.kept) / max(1, tokens),
    )
    return loss, figures


class S2TObjective(nn.Module):
    """The stage-I loss as one module: under torchrun, DDP sees every training forward."""

    def __init__(self, model: EchoXModel, patch_id: int, ctc_weight: float) -> None:
        super().__init__()
        self.model, self.patch_id, self.ctc_weight = model, patch_id, ctc_weight

    def forward(self, batch: SpokenBatch) -> tuple[torch.Tensor, StepFigures]:
        return s2t_loss(self.model, batch, self.patch_id, self.ctc_weight)


# --- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def monitor(model: EchoXModel, examples: Sequence[SpokenExample], patch_id: int, batch_size: int) -> dict[str, float]:
    """Teacher-forced dev figures on cached dev clips (cheap enough to run during training)."""
    was_training = model.training
    model.eval()
    totals = {"dev_ce": 0.0, "dev_ctc": 0.0, "dev_answer_token_accuracy": 0.0}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        _, figures = s2t_loss(model, collate(chunk), patch_id, 0.0)
        totals["dev_ce"] += figures.answer_ce * len(chunk)
        totals["dev_ctc"] += figures.ctc * len(chunk)
        totals["dev_answer_token_accuracy"] += figures.answer_token_accuracy * len(chunk)
    model.train(was_training)
    return {name: value / max(1, len(examples)) for name, value in totals.items()}


def s2t_accuracy(echox: EchoX, clips: Sequence[SpokenQuestion]) -> dict[str, Any]:
    """Greedy answers through the streaming code (`SpeechLLMStage.run`): the share containing the
    fact's key words, the share of CTC transcripts equal to the question (normalised words), and
    some misses."""
    was_training = echox.model.training
    echox.model.eval()
    stage = SpeechLLMStage(echox)
    heard = 0
    by_category: dict[str, list[bool]] = {}
    misses: list[dict[str, str]] = []
    for clip in clips:
        transcript, answer = "", ""
        for item in stage.run(stage.prepare(read_wav(clip.path), 16_000)):
            if isinstance(item, TranscriptEvent):
                transcript = item.text
            elif isinstance(item, AnswerEnd):
                answer = item.text
        heard += normalize(transcript) == normalize(clip.text)
        correct = has_key_words(answer, clip.key)
        by_category.setdefault(clip.category, []).append(correct)
        if not correct and len(misses) < 20:
            misses.append({"id": clip.id, "question": clip.text, "heard": transcript, "answer": answer})
    echox.model.train(was_training)
    n = max(1, len(clips))
    return {
        "s2t_accuracy": sum(sum(hits) for hits in by_category.values()) / n,
        "transcript_exact": heard / n,
        "clips": len(clips),
        "by_category": {name: round(sum(hits) / len(hits), 3) for name, hits in sorted(by_category.items())},
        "misses": misses,
    }


# --- training ------------------------------------------------------------------------------


def init_ctc_head(model: EchoXModel) -> None:
    """Start the CTC head as a copy of the LLM's input token table. The CTC loss then pulls the
    kept adapter frames towards the embeddings of the tokens they stand for, which is the input
    the pretrained LLM already understands: a small LLM learns to answer from speech far sooner."""
    with torch.no_grad():
        model.ctc_head.weight.copy_(model.input_table())


def add_lora(model: EchoXModel, settings: S2TSettings) -> None:
    """Wraps the LLM in peft LoRA adapters (only they learn); `merge_lora` folds them back."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_targets), bias="none",
    )
    # The peft wrapper forwards every call and attribute to the LLM it wraps: typed as that LLM.
    model.llm = cast(PreTrainedModel, get_peft_model(model.llm, config))


def merge_lora(model: EchoXModel) -> None:
    """The LoRA deltas merged into the LLM's weights: the model folder holds a plain LLM."""
    from peft import PeftModel

    if isinstance(model.llm, PeftModel):
        model.llm = model.llm.merge_and_unload()


def set_llm_trainable(model: EchoXModel, settings: S2TSettings, on: bool) -> None:
    """The LLM learns (its LoRA adapters only, with `lora_rank`) or stays frozen; the token
    table stays frozen with `freeze_embeddings`."""
    for name, parameter in model.llm.named_parameters():
        parameter.requires_grad_(on and (settings.lora_rank == 0 or "lora_" in name))
    if settings.freeze_embeddings:
        model.llm.get_input_embeddings().requires_grad_(False)


def trained_modules(model: EchoXModel) -> nn.ModuleDict:
    """The modules this stage trains, as one module (what the checkpoint holds)."""
    return nn.ModuleDict({name: getattr(model, name) for name in TRAINED_MODULES})


def make_optimizer(model: EchoXModel, settings: S2TSettings) -> torch.optim.Optimizer:
    new = [p for name in NEW_MODULES for p in getattr(model, name).parameters()]
    set_llm_trainable(model, settings, True)  # the parameters that ever learn
    llm = [p for p in model.llm.parameters() if p.requires_grad]
    groups = [
        {"params": new, "lr": settings.lr, "peak_lr": settings.lr},
        {"params": llm, "lr": settings.llm_lr, "peak_lr": settings.llm_lr},
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=settings.weight_decay)


def train_steps(
    ctx: StageContext,
    settings: S2TSettings,
    model: EchoXModel,
    train: Sequence[SpokenExample],
    dev: Sequence[SpokenExample],
    patch_id: int,
) -> dict[str, Any]:
    """The training loop, resumed from RUN/s2t/checkpoint when one is there. Under torchrun each
    rank takes its share of every batch and rank 0 alone logs, evaluates and checkpoints."""
    parallel = ctx.parallel
    if parallel.active and settings.llm_frozen_share > 0:
        raise ConfigError("settings.s2t: llm_frozen_share needs one process (DDP cannot change what learns)")
    optimizer = make_optimizer(model, settings)
    state_module = trained_modules(model)
    parallel.prepare(model, state_module)
    objective = parallel.wrap(S2TObjective(model, patch_id, settings.ctc_weight))
    checkpoint = ctx.out / CHECKPOINT_DIR
    step, extra = load_training_state(checkpoint, state_module, optimizer)
    elapsed_before = float(extra.get("elapsed_s", 0.0))
    metrics = MetricsLog(ctx.out)
    for name in metrics.curves:  # points logged after the checkpoint will be logged again
        metrics.curves[name] = [p for p in metrics.curves[name] if p[0] <= step]
    ctx.reporter.start(ctx.stage, settings.steps, "steps")
    ctx.reporter.advance(step)
    started, elapsed = time.perf_counter(), elapsed_before
    progress = schedule_progress(step, settings.steps, elapsed, settings.max_minutes)
    window: list[StepFigures] = []
    state_module.train()
    while progress < 1.0:
        ctx.check_cancelled()
        set_learning_rate(optimizer, factor=warmup_cosine(step, settings.warmup, progress, settings.min_lr_ratio))
        if settings.llm_frozen_share > 0:
            set_llm_trainable(model, settings, progress >= settings.llm_frozen_share)
        chosen = parallel.shard(batch_indices(len(train), settings.batch_size, ctx.seed, step))
        with parallel.autocast():
            loss, figures = objective(collate([train[i] for i in chosen]))
        optimizer_step(optimizer, loss, state_module.parameters(), settings.grad_clip)
        step += 1
        elapsed = elapsed_before + time.perf_counter() - started
        progress = parallel.agree_max(schedule_progress(step, settings.steps, elapsed, settings.max_minutes))
        window.append(figures)
        ctx.reporter.advance(1, loss=figures.loss, ctc=figures.ctc)
        finished = progress >= 1.0
        if not parallel.is_main:
            continue
        if step % settings.log_every == 0 or finished:
            metrics.add(step, **{k: sum(getattr(f, k) for f in window) / len(window) for k in _CURVES})
            window.clear()
        if dev and (step % settings.eval_every == 0 or finished):
            with parallel.autocast():
                figures_dev = monitor(model, dev, patch_id, settings.batch_size)
            metrics.add(step, **figures_dev)
            ctx.reporter.log(f"s2t step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in figures_dev.items()))
        if step % settings.checkpoint_every == 0 or finished:
            save_training_state(checkpoint, state_module, optimizer, step, {"elapsed_s": elapsed})
            metrics.save()
    if not parallel.replicas_agree(state_module):
        raise RuntimeError("s2t: the training processes ended with different weights")
    return {"steps_done": step, "train_seconds": round(elapsed, 1), "stopped_by_time": step < settings.steps,
            "processes": parallel.world_size, "device": parallel.device.type}


_CURVES = ("loss", "answer_ce", "ctc", "answer_token_accuracy", "kept_per_token")


def with_histories(
    plan: Sequence[Rendition], others: Sequence[SpokenQuestion], share: float, seed: int
) -> dict[str, tuple[Turn, ...]]:
    """An earlier text turn (another fact's question and answer) for a `share` of the renditions."""
    rng = random.Random(seed + 1)
    histories: dict[str, tuple[Turn, ...]] = {}
    for rendition in plan:
        if others and rng.random() < share:
            other = rng.choice(others)
            if other.fact_id != rendition.question.fact_id:
                histories[rendition.key] = (Turn(other.text, other.answer),)
    return histories


def run(ctx: StageContext) -> dict[str, Any]:
    settings = S2TSettings.from_mapping(ctx.settings)
    if ctx.facts is None:
        raise ConfigError("stage s2t needs the fact base (the recipe's `facts`)")
    torch.set_num_threads(settings.threads)
    echox = assemble_parts(ctx.run_dir, ctx.seed, preset=ctx.preset)
    model, tokenizer = echox.model, echox.tokenizer
    patch_id = tokenizer.audio_patch_id
    if settings.ctc_head_from_embeddings:
        init_ctc_head(model)  # a resumed run loads its trained head over this
    if settings.lora_rank > 0:
        add_lora(model, settings)
    model.to(ctx.parallel.device)
    facts = {fact.id: fact for fact in load_facts(ctx.facts)}
    synth = ctx.input("synth")
    train_clips = load_spoken_questions(synth, facts, "train")
    dev_clips = load_spoken_questions(synth, facts, "dev")
    plan = plan_renditions(train_clips, settings.clean_per_text, settings.augmented_per_text, ctx.seed)
    monitor_plan = [Rendition(clip) for clip in sample_clips(dev_clips, settings.monitor_clips, ctx.seed + 1)]
    augment = settings.augment_settings
    ctx.reporter.start(f"{ctx.stage} encode", len(plan) + len(monitor_plan), "clips")

    def encoded_some(count: int) -> None:
        ctx.check_cancelled()
        ctx.reporter.advance(count)

    encoded = encode_shared(
        ctx.parallel, model, [*plan, *monitor_plan], augment, ctx.seed, ctx.out / ENCODED_DIR, settings.encode_batch,
        encoded_some,
    )
    histories = with_histories(plan, train_clips, settings.history_share, ctx.seed)
    train = build_examples(plan, encoded, tokenizer, histories)
    dev = build_examples(monitor_plan, encoded, tokenizer)
    encoder = "asr" if (ctx.run_dir / ENCODER_STAGE / DONE_FILE).is_file() else "random"
    ctx.reporter.log(f"s2t: {len(train)} train renditions ({encoder} speech encoder), {len(dev)} dev monitor clips")
    trained = train_steps(ctx, settings, model, train, dev, patch_id)
    if not ctx.parallel.is_main:
        return trained
    merge_lora(model)
    model.float().eval()  # one dtype again after bf16 training: the folder and inference expect it
    echox.save_pretrained(ctx.out / MODEL_DIR)
    evaluation = s2t_accuracy(echox, sample_clips(dev_clips, settings.dev_clips, ctx.seed))
    metrics = MetricsLog(ctx.out)
    metrics.set(evaluation=evaluation, speech_encoder=encoder)
    metrics.save()
    ctx.reporter.log(f"s2t: dev S2T accuracy {evaluation['s2t_accuracy']:.3f} on {evaluation['clips']} clips")
    return {
        **trained,
        "speech_encoder": encoder,
        "train_renditions": len(train),
        "s2t_accuracy": evaluation["s2t_accuracy"],
        "transcript_exact": evaluation["transcript_exact"],
        "dev_clips": evaluation["clips"],
    }
