"""Stage `echo` (stage III of the method): spoken question → answer text + speech units, end to end.

Starts from the whole model of the `s2t` stage; the spoken questions, their encoder states and
batches come from `training.listen_data` (the states the s2t stage cached are reused when its
encoder is this model's), the S2T forward pass and loss from `training.stages.s2t`. Training
questions: train voices, about the facts whose recorded answer is in the train split (setting
`facts`); dev questions: dev voices, about the facts whose recorded answer is held out. For each
spoken question of a batch:

1. `echo` targets: the model (eval mode, as inference runs it) greedy-decodes its answer, and
   the frozen stage-II T2C speaks each sentence of it (cached per example while the answer is
   unchanged, see `training.echo_targets`). `gold` targets: the units of the recorded answer,
   paired with the hidden states of the gold answer;
2. the teacher-forced S2T pass gives the S2T loss (CE on the gold answer + ctc_weight × CTC on
   the transcript) and the hidden states; an example whose decoded answer differs from the gold
   one gets a second pass over its decoded answer. Answer token i is paired with the hidden
   state that PREDICTED it (position P−1+i after a prompt of P positions), as
   `SpeechLLMStage.decode` pairs them at inference;
3. each sentence segment is laid out as `UnitStage.generate` lays it out,
   table[prefix] ; aligner(h[start:end]) ; table[suffix] ; unit tokens, and the echo decoder
   (initialised from stage II) learns the unit tokens (CE) while the denoising loss
   Σ_t (1 − cos(aligner(h_t), E[y_t])) (summed per segment, averaged over segments) pulls the
   aligner's outputs to the input-table rows of the tokens, weighted w = min(1, ratio · CE / L).

Loss = CE_units + w · L_denoise + s2t_weight · (CE_answer + ctc_weight · CTC). The speech encoder
and the vocoder stay frozen; adapter, CTC head, LookBack and LLM learn at `lr_listen`, aligner
and echo decoder at `lr_speak`. The same module runs as `echo_gold` with `targets: gold`.

Dev figures (metrics.json, every `eval_every` steps and at the end): dev_s2t_accuracy (key words
in the decoded answer), dev_echo_ce / dev_echo_unit_accuracy (unit tokens against the frozen
T2C's targets for the decoded answer) and dev_gold_ce / dev_gold_unit_accuracy (against the
recorded answer's units), the same four in both target modes.

Output (RUN/<stage>/): model/ (EchoX.save_pretrained), metrics.json, loss.png, checkpoint/,
encoded/ (encoder states s2t had not cached), echo_targets.jsonl (the sentences the T2C spoke,
reused on resume), samples/ (a few dev answers spoken end to end, with index.json).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from echox.audio import read_wav, write_wav
from echox.checkpoint import EchoX
from echox.errors import ConfigError
from echox.models.echox import EchoXModel
from training.augment import AugmentSettings
from training.echo_targets import (
    EchoTargetCache,
    FrozenT2C,
    SegmentTarget,
    answer_ids,
    decode_answers,
    gold_targets,
    predicting_states,
    read_pieces,
    with_answer,
)
from training.jsonl import read_jsonl
from training.judge import has_key_words
from training.listen_data import (
    CLEAN,
    Rendition,
    SpokenExample,
    SpokenQuestion,
    batch_indices,
    build_examples,
    collate,
    encode_audios,
    encode_shared,
    load_spoken_questions,
    plan_renditions,
    sample_clips,
)
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
from training.stages.s2t import SpokenForward, answer_ce, forward_spoken
from training.stages.synth import ANSWERS_MANIFEST
from training.stages.t2c import IGNORE_INDEX, PIECES_FILE, allowed_argmax, build_sequence, load_text_side
from training.text_data import Fact, load_facts

TARGET_MODES = ("echo", "gold")
CHECKPOINT_DIR = "checkpoint"
ENCODED_DIR = "encoded"
MODEL_DIR = "model"
TARGETS_FILE = "echo_targets.jsonl"
SAMPLES_DIR = "samples"
TRAINED_MODULES = ("speech_adapter", "ctc_head", "lookback", "llm", "aligner", "echo_decoder")


@dataclasses.dataclass(frozen=True)
class EchoSettings:
    """`settings.echo` (and `settings.echo_gold`) of a recipe. Unknown keys are an error."""

    targets: str = "echo"  # "echo": pseudo-units of the model's own answer; "gold": recorded units
    steps: int = 300
    batch_size: int = 12
    lr_speak: float = 5e-4  # aligner + echo decoder
    lr_listen: float = 5e-5  # adapter, CTC head, LookBack, LLM
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    s2t_weight: float = 1.0
    ctc_weight: float = 0.3
    denoise_ratio: float = 0.2  # w = min(1, denoise_ratio · CE_units / L_denoise)
    echo_grad_to_llm: bool = True  # the unit losses also reach the LLM through its hidden states
    train_llm: bool = True  # False: the LLM stays as stage I left it (the large presets: no LoRA here)
    # False: the echo decoder stays as stage II left it and only the aligner learns to feed it
    # (the spec trains both; this keeps the text-to-units path of `echox speak` intact).
    train_decoder: bool = True
    facts: str = "train"  # "train": facts whose recorded answer is in the train split; "all"
    clean_per_text: int = 1  # clean train clips per question text (listen_data.plan_renditions)
    augmented_per_text: int = 0
    augment: dict[str, Any] = dataclasses.field(default_factory=dict)  # AugmentSettings fields
    encode_batch: int = 8
    max_decode_tokens: int = 64
    dev_clips: int = 48  # dev-voice questions about facts whose recorded answer is held out
    eval_every: int = 100
    checkpoint_every: int = 50
    log_every: int = 10
    samples: int = 3  # dev answers spoken end to end into samples/ at the end (0: none)
    max_minutes: float = 8.0  # training-loop time cap; the LR schedule ends by then too; 0: none
    threads: int = 1

    def __post_init__(self) -> None:
        if self.targets not in TARGET_MODES:
            raise ConfigError(f"settings.echo: targets must be one of {TARGET_MODES}, not {self.targets!r}")
        if self.facts not in ("train", "all"):
            raise ConfigError(f"settings.echo: facts must be 'train' or 'all', not {self.facts!r}")
        if self.clean_per_text + self.augmented_per_text < 1:
            raise ConfigError("settings.echo: clean_per_text + augmented_per_text must be at least 1")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EchoSettings:
        settings = cls(**settings_kwargs(cls, values, "settings.echo"))
        AugmentSettings.from_mapping(settings.augment)  # fails early on a bad augment mapping
        return settings


# --- the echo loss -------------------------------------------------------------------------


@dataclasses.dataclass
class EchoSegment:
    states: torch.Tensor  # [n, H] the hidden states that predicted the segment's tokens
    text_ids: tuple[int, ...]  # those tokens
    unit_tokens: tuple[int, ...]


@dataclasses.dataclass
class EchoLoss:
    ce: torch.Tensor
    denoise: torch.Tensor
    correct: int
    count: int


def denoise_weight(ce_units: torch.Tensor, denoise: torch.Tensor, ratio: float) -> torch.Tensor:
    """w = min(1, ratio · CE_units / L_denoise), detached: the denoising term never outweighs
    `ratio` × the unit loss."""
    return (ratio * ce_units.detach() / denoise.detach().clamp_min(1e-8)).clamp(max=1.0)


def echo_loss(model: EchoXModel, segments: Sequence[EchoSegment], prefix: Sequence[int], suffix: Sequence[int],
              stop_id: int) -> EchoLoss:
    """Unit CE (and argmax accuracy over unit/stop ids) of the echo decoder on the segments laid
    out as `UnitStage.generate` lays them out, plus the per-segment-summed denoising loss."""
    decoder, table, device = model.echo_decoder, model.input_table().detach(), model.device
    v_text = decoder.config.text_vocab_size
    aligned = model.aligner(torch.cat([s.states for s in segments])).split([len(s.states) for s in segments])
    rows, labels, denoise = [], [], []
    for segment, mapped in zip(segments, aligned, strict=True):
        ids, targets = build_sequence(prefix, segment.text_ids, suffix, segment.unit_tokens, v_text, stop_id)
        embedded = decoder.embed(torch.tensor(ids, device=device), table)
        rows.append(torch.cat([embedded[: len(prefix)], mapped, embedded[len(prefix) + len(mapped) :]]))
        labels.append(torch.tensor(targets, device=device))
        cosine = F.cosine_similarity(mapped, table[torch.tensor(segment.text_ids, device=device)], dim=-1)
        denoise.append((1.0 - cosine).sum())
    width = max(len(r) for r in rows)
    inputs = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])
    mask = torch.stack([torch.arange(width, device=device) < len(r) for r in rows]).long()
    flat_labels = torch.cat([F.pad(x, (0, width - len(x)), value=IGNORE_INDEX) for x in labels])
    logits, _ = decoder(inputs, attention_mask=mask)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        keep = flat_labels != IGNORE_INDEX
        chosen = allowed_argmax(decoder, flat_logits[keep], flat_labels[keep])
        correct = int((chosen == flat_labels[keep]).sum())
    return EchoLoss(ce, torch.stack(denoise).mean(), correct, int(keep.sum()))


# --- one batch -----------------------------------------------------------------------------


@dataclasses.dataclass
class Layout:
    """Token ids every batch needs."""

    patch_id: int
    eos_id: int
    t2c_prefix: list[int]
    t2c_suffix: list[int]


@dataclasses.dataclass
class TargetBook:
    """Unit targets: echo (per example, from the frozen T2C) and gold (per fact)."""

    echo: EchoTargetCache
    gold: dict[str, list[SegmentTarget]]


@dataclasses.dataclass
class Passes:
    """The S2T pass over the gold answers, and where each example's paired answer lies."""

    gold: SpokenForward
    paired: list[list[int]]  # the answer each example's targets belong to
    forwards: list[tuple[SpokenForward, int]]  # (pass, row) holding that answer


def run_passes(model: EchoXModel, examples: Sequence[SpokenExample], paired: Sequence[list[int]] | None,
               layout: Layout) -> Passes:
    """The teacher-forced S2T pass; examples whose paired answer is not the gold one get a
    second pass over [prompt ; paired answer ; eos] (its CE and CTC are not used)."""
    gold_pass = forward_spoken(model, collate(examples), layout.patch_id)
    gold = [answer_ids(e) for e in examples]
    answers = list(paired) if paired is not None else gold
    forwards = [(gold_pass, row) for row in range(len(examples))]
    changed = [i for i, (a, g) in enumerate(zip(answers, gold, strict=True)) if a != g]
    if changed:
        other = forward_spoken(model, collate([with_answer(examples[i], answers[i], layout.eos_id) for i in changed]),
                               layout.patch_id)
        for row, i in enumerate(changed):
            forwards[i] = (other, row)
    return Passes(gold_pass, answers, forwards)


def segments_of(passes: Passes, targets: Sequence[Sequence[SegmentTarget]], detach: bool) -> list[EchoSegment]:
    """Each target with the hidden states that predicted its tokens in its answer's pass."""
    segments = []
    for (forward, row), answer, wanted in zip(passes.forwards, passes.paired, targets, strict=True):
        for target in wanted:
            states = predicting_states(forward, row, target.start, target.end)
            segments.append(EchoSegment(states.detach() if detach else states,
                                        tuple(answer[target.start : target.end]), target.unit_tokens))
    return segments


def batch_targets(book: TargetBook, examples: Sequence[SpokenExample], decoded: Sequence[list[int]] | None
                  ) -> list[list[SegmentTarget]]:
    """Gold targets of each example's fact, or echo targets of each decoded answer."""
    if decoded is None:
        return [book.gold[e.fact_id] for e in examples]
    return [book.echo.targets(e.key, answer) for e, answer in zip(examples, decoded, strict=True)]


def train_losses(model: EchoXModel, layout: Layout, book: TargetBook, examples: Sequence[SpokenExample],
                 settings: EchoSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's total loss and its parts."""
    decoded = None
    if settings.targets == "echo":
        decoded = decode_answers(model, examples, layout.patch_id, layout.eos_id, settings.max_decode_tokens)
    passes = run_passes(model, examples, decoded, layout)
    ce_answer, answer_accuracy = answer_ce(passes.gold)
    s2t = ce_answer + settings.ctc_weight * passes.gold.ctc_loss
    segments = segments_of(passes, batch_targets(book, examples, decoded), detach=not settings.echo_grad_to_llm)
    figures = {"ce_answer": ce_answer.item(), "answer_token_accuracy": answer_accuracy,
               "ctc": passes.gold.ctc_loss.item()}
    if not segments:  # every answer was empty
        return settings.s2t_weight * s2t, {"loss": settings.s2t_weight * s2t.item(), **figures}
    echo = echo_loss(model, segments, layout.t2c_prefix, layout.t2c_suffix, layout.eos_id)
    weight = denoise_weight(echo.ce, echo.denoise, settings.denoise_ratio)
    loss = echo.ce + weight * echo.denoise + settings.s2t_weight * s2t
    changed = sum(f[0] is not passes.gold for f in passes.forwards) / len(examples)
    figures.update(ce_units=echo.ce.item(), unit_accuracy=echo.correct / max(1, echo.count),
                   denoise=echo.denoise.item(), denoise_weight=weight.item(), answers_changed=changed)
    return loss, {"loss": loss.item(), **figures}


# --- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: EchoXModel, layout: Layout, book: TargetBook, examples: Sequence[SpokenExample],
             keys: Mapping[str, Sequence[str]], settings: EchoSettings) -> dict[str, float]:
    """On held-out examples: S2T key-word accuracy of the decoded answers, and the echo decoder's
    unit CE / accuracy against echo targets (hidden states of the decoded answer) and against
    gold targets (hidden states of the gold answer), whatever the stage's own target mode."""
    was_training = model.training
    model.eval()
    sums = {"echo": [0.0, 0.0, 0.0], "gold": [0.0, 0.0, 0.0]}  # ce·count, correct, count
    right = 0
    decode_text = book.echo.t2c.tokenizer.decode
    for start in range(0, len(examples), settings.batch_size):
        chunk = examples[start : start + settings.batch_size]
        decoded = decode_answers(model, chunk, layout.patch_id, layout.eos_id, settings.max_decode_tokens)
        right += sum(has_key_words(decode_text(d), keys[e.fact_id]) for d, e in zip(decoded, chunk, strict=True))
        passes = run_passes(model, chunk, decoded, layout)
        gold = Passes(passes.gold, [answer_ids(e) for e in chunk], [(passes.gold, row) for row in range(len(chunk))])
        for name, paired, on in (("echo", decoded, passes), ("gold", None, gold)):
            segments = segments_of(on, batch_targets(book, chunk, paired), detach=True)
            if segments:
                result = echo_loss(model, segments, layout.t2c_prefix, layout.t2c_suffix, layout.eos_id)
                for i, value in enumerate((float(result.ce) * result.count, result.correct, result.count)):
                    sums[name][i] += value
    model.train(was_training)
    figures = {"dev_s2t_accuracy": right / max(1, len(examples))}
    for name, (ce, correct, count) in sums.items():
        figures[f"dev_{name}_ce"] = ce / max(1.0, count)
        figures[f"dev_{name}_unit_accuracy"] = correct / max(1.0, count)
    return figures


def speak_samples(echox: EchoX, clips: Sequence[SpokenQuestion], folder: Path) -> list[dict[str, Any]]:
    """Dev questions answered end to end by the streaming responder: WAVs and index.json."""
    from echox.events import AudioEvent, DoneEvent
    from echox.streaming.responder import StreamingResponder

    folder.mkdir(parents=True, exist_ok=True)
    responder = StreamingResponder(echox)
    index = []
    for clip in clips:
        pieces, done = [np.zeros(0, dtype=np.float32)], None
        for event in responder.respond(read_wav(clip.path)):
            if isinstance(event, AudioEvent):
                pieces.append(event.pcm)
            elif isinstance(event, DoneEvent):
                done = event
        assert done is not None  # respond() always ends with Done
        write_wav(folder / f"{clip.id}.wav", np.concatenate(pieces), echox.config.vocoder.sample_rate)
        index.append({"id": clip.id, "question": clip.text, "heard": done.transcript, "answer": done.text,
                      "reference": clip.answer, "right_in_text": has_key_words(done.text, clip.key)})
    (folder / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


# --- training ------------------------------------------------------------------------------


def trained_modules(model: EchoXModel) -> nn.ModuleDict:
    """The modules this stage trains, as one module (what the checkpoint holds)."""
    return nn.ModuleDict({name: getattr(model, name) for name in TRAINED_MODULES})


def make_optimizer(model: EchoXModel, settings: EchoSettings) -> torch.optim.AdamW:
    """Aligner + echo decoder at lr_speak; adapter, CTC head, LookBack, LLM at lr_listen."""
    # The LLM's (tied) token table stays frozen: the echo decoder reads it as its text rows.
    model.llm.requires_grad_(settings.train_llm)
    model.llm.get_input_embeddings().requires_grad_(False)
    model.echo_decoder.requires_grad_(settings.train_decoder)
    speak = [p for p in (*model.aligner.parameters(), *model.echo_decoder.parameters()) if p.requires_grad]
    listen = [p for name in TRAINED_MODULES[:4] for p in getattr(model, name).parameters() if p.requires_grad]
    groups = [{"params": speak, "peak_lr": settings.lr_speak}, {"params": listen, "peak_lr": settings.lr_listen}]
    return torch.optim.AdamW(groups, lr=settings.lr_speak, betas=(0.9, 0.98), weight_decay=settings.weight_decay)


@dataclasses.dataclass
class Training:
    """What the loop works on."""

    model: EchoXModel
    layout: Layout
    book: TargetBook
    train: list[SpokenExample]
    dev: list[SpokenExample]
    dev_book: TargetBook  # its own echo cache (same spoken sentences): dev never counts as training
    keys: dict[str, tuple[str, ...]]  # fact id → key words


class EchoObjective(nn.Module):
    """The stage-III loss as one module: under torchrun, DDP sees every training forward."""

    def __init__(self, work: Training, settings: EchoSettings) -> None:
        super().__init__()
        self.model, self.work, self.settings = work.model, work, settings

    def forward(self, examples: Sequence[SpokenExample]) -> tuple[torch.Tensor, dict[str, float]]:
        return train_losses(self.model, self.work.layout, self.work.book, examples, self.settings)


def train_loop(ctx: StageContext, settings: EchoSettings, work: Training) -> dict[str, Any]:
    """AdamW steps until `steps` or `max_minutes`; resumes from checkpoint/, logs, evaluates.
    Under torchrun each rank takes its share of every batch; rank 0 alone logs, evaluates and
    checkpoints."""
    model, optimizer, state_module = work.model, make_optimizer(work.model, settings), trained_modules(work.model)
    parallel = ctx.parallel
    parallel.prepare(model, state_module)
    objective = parallel.wrap(EchoObjective(work, settings), find_unused=True)  # an all-empty batch has no units
    state_dir = ctx.out / CHECKPOINT_DIR
    step, extra = load_training_state(state_dir, state_module, optimizer)
    elapsed_before = float(extra.get("elapsed_s", 0.0))
    metrics = MetricsLog(ctx.out)
    for name in metrics.curves:  # points logged after the checkpoint will be logged again
        metrics.curves[name] = [p for p in metrics.curves[name] if p[0] <= step]
    ctx.reporter.start(ctx.stage, settings.steps)
    ctx.reporter.advance(step)
    started, elapsed, window = time.perf_counter(), elapsed_before, list[dict[str, float]]()
    progress = schedule_progress(step, settings.steps, elapsed, settings.max_minutes)
    if work.dev and step == 0 and parallel.is_main:  # the starting point: the s2t model, untrained aligner
        with parallel.autocast():
            metrics.add(0, **evaluate(model, work.layout, work.dev_book, work.dev, work.keys, settings))
    model.train()
    while progress < 1.0:
        ctx.check_cancelled()
        set_learning_rate(optimizer, factor=warmup_cosine(step, settings.warmup, progress, settings.min_lr_ratio))
        chosen = parallel.shard(batch_indices(len(work.train), settings.batch_size, ctx.seed, step))
        with parallel.autocast():
            loss, figures = objective([work.train[i] for i in chosen])
        optimizer_step(optimizer, loss, state_module.parameters(), settings.grad_clip)
        step += 1
        elapsed = elapsed_before + time.perf_counter() - started
        progress = parallel.agree_max(schedule_progress(step, settings.steps, elapsed, settings.max_minutes))
        window.append(figures)
        ctx.reporter.advance(1, loss=figures["loss"])
        if not parallel.is_main:
            continue
        if step % settings.log_every == 0 or progress >= 1.0:
            names = dict.fromkeys(k for w in window for k in w)
            metrics.add(step, **{k: float(np.mean([w[k] for w in window if k in w])) for k in names})
            window.clear()
        if work.dev and step % settings.eval_every == 0 and progress < 1.0:
            with parallel.autocast():
                dev = evaluate(model, work.layout, work.dev_book, work.dev, work.keys, settings)
            metrics.add(step, **dev)
            ctx.reporter.log(f"{ctx.stage} step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in dev.items()))
        if step % settings.checkpoint_every == 0 or progress >= 1.0:
            save_training_state(state_dir, state_module, optimizer, step, {"elapsed_s": elapsed})
            work.book.echo.save(ctx.out / TARGETS_FILE)
            metrics.save()
    if not parallel.replicas_agree(state_module):
        raise RuntimeError(f"{ctx.stage}: the training processes ended with different weights")
    if not parallel.is_main:
        return {"steps": step}
    with parallel.autocast():
        dev = evaluate(model, work.layout, work.dev_book, work.dev, work.keys, settings) if work.dev else {}
    metrics.add(step, **dev)
    summary = {"steps": step, "stopped_by_time": step < settings.steps, "train_seconds": round(elapsed, 1),
               "processes": parallel.world_size, "device": parallel.device.type,
               **{k: round(v, 4) for k, v in dev.items()}, **work.book.echo.figures()}
    metrics.set(**summary)
    metrics.save()
    return summary


# --- the stage -----------------------------------------------------------------------------


def renditions(ctx: StageContext, facts: Mapping[str, Fact], settings: EchoSettings
               ) -> tuple[list[Rendition], list[Rendition]]:
    """(train, dev) renditions. Train: planned over ALL train-voice clips as the s2t stage plans
    them (same seed: the same clips, so its cached states serve), then kept for the chosen facts.
    Dev: `dev_clips` clean dev-voice questions about facts whose recorded answer is held out
    (about any fact when the run holds no answer out: synth's answer_dev_share 0)."""
    synth = ctx.input("synth")
    rows = read_jsonl(synth / ANSWERS_MANIFEST, "run the synth stage first")
    answer_split = {row["fact_id"]: row["split"] for row in rows}
    plan = plan_renditions(load_spoken_questions(synth, facts, "train"), settings.clean_per_text,
                           settings.augmented_per_text, ctx.seed)
    train = [r for r in plan if settings.facts == "all" or answer_split.get(r.question.fact_id) == "train"]
    held_out = {fact_id for fact_id, split in answer_split.items() if split == "dev"}
    dev = [q for q in load_spoken_questions(synth, facts, "dev") if not held_out or q.fact_id in held_out]
    if not train:
        raise ConfigError(f"stage {ctx.stage}: no training questions in {synth}")
    return train, [Rendition(clip) for clip in sample_clips(dev, settings.dev_clips, ctx.seed + 1)]


def s2t_cached_states(folder: Path, model: EchoXModel, wanted: Sequence[Rendition]) -> dict[str, torch.Tensor]:
    """The wanted renditions' encoder states that the s2t stage cached (listen_data shards in
    RUN/s2t/encoded), when its encoder is this model's: checked by encoding one clean clip again.
    An augmented rendition is taken as the s2t stage drew it."""
    keys, found = {r.key for r in wanted}, dict[str, torch.Tensor]()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as shard:
            found.update({key: shard.get_tensor(key) for key in shard.keys() if key in keys})  # noqa: SIM118
    probe = next((r for r in wanted if r.key in found and r.variant == CLEAN), None)
    if probe is None:
        return {}
    cached, fresh = found[probe.key].float(), encode_audios(model, [read_wav(probe.question.path)])[0].float().cpu()
    same = cached.shape == fresh.shape and torch.allclose(cached, fresh, rtol=1e-2, atol=1e-2)
    return found if same else {}


def target_book(ctx: StageContext, echox: EchoX, layout: Layout, facts: Mapping[str, Fact]) -> TargetBook:
    """The frozen stage-II T2C (with the lm stage's input table it was trained on) and every
    fact's gold targets."""
    tokenizer = echox.tokenizer
    frozen_table = load_text_side(ctx.input("lm"), tokenizer.chat).table
    t2c = FrozenT2C.load(ctx.input("t2c"), frozen_table, tokenizer, layout.t2c_prefix, layout.t2c_suffix)
    rows = read_jsonl(ctx.input("units") / "units.jsonl", "run the units stage first")
    units = {row["fact_id"]: row["units"] for row in rows}
    pieces = read_pieces(ctx.input("t2c") / PIECES_FILE)
    gold = {fact_id: gold_targets(tokenizer, echox.codec, tokenizer.encode(fact.answer), units[fact_id], pieces)
            for fact_id, fact in facts.items() if fact_id in units}
    return TargetBook(EchoTargetCache(t2c, EchoTargetCache.read(ctx.out / TARGETS_FILE)), gold)


def spoken_examples(ctx: StageContext, settings: EchoSettings, echox: EchoX, plan: Sequence[Rendition],
                    dev_plan: Sequence[Rendition]) -> tuple[list[SpokenExample], list[SpokenExample]]:
    """Encoder states of the renditions (the s2t stage's cache, else encoded here and cached in
    encoded/), as listen_data examples."""
    wanted = [*plan, *dev_plan]
    states = s2t_cached_states(ctx.input("s2t") / ENCODED_DIR, echox.model, wanted)
    missing = [r for r in wanted if r.key not in states]
    ctx.reporter.start(f"{ctx.stage} encode", len(wanted), "clips")
    ctx.reporter.advance(len(wanted) - len(missing))

    def progress(done: int) -> None:
        ctx.check_cancelled()
        ctx.reporter.advance(done)

    if missing:
        states.update(encode_shared(
            ctx.parallel, echox.model, missing, AugmentSettings.from_mapping(settings.augment), ctx.seed,
            ctx.out / ENCODED_DIR, settings.encode_batch, progress,
        ))
    return build_examples(plan, states, echox.tokenizer), build_examples(dev_plan, states, echox.tokenizer)


def run(ctx: StageContext) -> dict[str, Any]:
    """The `echo` stage (and `echo_gold`); settings: see EchoSettings."""
    settings = EchoSettings.from_mapping(ctx.settings)
    if ctx.facts is None:
        raise ConfigError(f"stage {ctx.stage} needs the fact base (the recipe's `facts`)")
    torch.set_num_threads(settings.threads)
    torch.manual_seed(ctx.seed)
    echox = EchoX.from_pretrained(ctx.input("s2t") / MODEL_DIR)
    model, tokenizer = echox.model, echox.tokenizer
    model.to(ctx.parallel.device)
    layout = Layout(tokenizer.audio_patch_id, tokenizer.eos_id, model.t2c_prefix_ids(tokenizer.bos_id),
                    model.t2c_suffix_ids(tokenizer.eos_id))
    facts = {fact.id: fact for fact in load_facts(ctx.facts)}
    train_plan, dev_plan = renditions(ctx, facts, settings)
    train, dev = spoken_examples(ctx, settings, echox, train_plan, dev_plan)
    book = target_book(ctx, echox, layout, facts)
    dev_book = TargetBook(EchoTargetCache(book.echo.t2c, book.echo.spoken), book.gold)
    # Warm the shared sentence cache with the gold answers, which a trained S2T model mostly
    # decodes: one batched T2C pass instead of one greedy run per sentence.
    spoken_facts = {e.fact_id for e in dev} | ({e.fact_id for e in train} if settings.targets == "echo" else set())
    book.echo.prefetch([facts[fact_id].answer for fact_id in sorted(spoken_facts)])
    work = Training(model, layout, book, train, dev, dev_book, {fact_id: fact.key for fact_id, fact in facts.items()})
    ctx.reporter.log(f"{ctx.stage}: {settings.targets} targets, {len(train)} train and {len(dev)} dev questions")
    result = train_loop(ctx, settings, work)
    if not ctx.parallel.is_main:
        return result
    model.float().eval()  # one dtype again after bf16 training: the folder and inference expect it
    echox.save_pretrained(ctx.out / MODEL_DIR)
    clips = [r.question for r in dev_plan[: settings.samples]]
    samples = speak_samples(echox, clips, ctx.out / SAMPLES_DIR) if clips else []
    return {**result, "targets": settings.targets, "train_questions": len(train), "dev_questions": len(dev),
            "samples_right_in_text": sum(s["right_in_text"] for s in samples)}
