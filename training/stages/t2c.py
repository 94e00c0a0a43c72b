"""Stage `t2c` (stage II of the method): the echo decoder learns text → unit-language tokens.

Input = the answer's text embeddings, read from the LLM's FROZEN input table, followed by the
unit-language tokens of its speech; cross-entropy on the unit tokens (and the stop id) only. The
LLM itself is not run. A sequence is laid out exactly as `UnitStage.generate` lays out inference:

    [table[bos] ; table[text ids] ; table[eos]] [unit tokens] → targets: unit tokens, then eos

(stage III later puts aligner(hidden states) where the text embeddings are).

Training segments follow sentence punctuation, so the decoder sees the pieces the streaming
trigger cuts: whole answers, and for answers of several sentences each sentence alone, rendered
separately in the agent voice and turned into units with the units stage's k-means. Optional
"vocabulary phrases" (random runs of the fact base's words, also rendered in the agent voice)
teach the decoder the sound of every word the LLM can say; the dev answers' own sentences and
recordings never enter training, so dev figures measure unseen sentences.

Output (`RUN/t2c/`): `echo_decoder.safetensors` + `echo_decoder.json` (save_part), metrics.json,
loss.png, and `checkpoint/` for resume (with `average.safetensors` when `average_decay` is set).
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from echox.audio import FloatArray
from echox.checkpoint import load_part_weights, read_part_config, save_part
from echox.errors import EchoXError
from echox.models.echo_decoder import EchoDecoder, EchoDecoderConfig
from echox.models.llm import LLMConfig, build_llm
from echox.models.presets import get_preset
from echox.tokenizer import ChatFormat, TextTokenizer
from echox.units.codec import UnitLanguageCodec
from training.jsonl import read_jsonl, write_jsonl
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
from training.stages.lm import load_lm_tokenizer
from training.stages.units import answers_with_units
from training.text_data import Fact

IGNORE_INDEX = -100
PART_NAME = "echo_decoder"
CHECKPOINT_DIR = "checkpoint"
PIECES_FILE = "pieces.jsonl"  # rendered sentence pieces and phrases, kept so a resume skips them
SOURCES = ("answer", "sentence", "question", "phrase", "variant")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# Renders texts in one voice and returns each one's deduplicated units.
UnitRenderer = Callable[[Sequence[str]], list[list[int]]]


@dataclasses.dataclass(frozen=True)
class T2CSettings:
    """`settings.t2c` of a recipe."""

    steps: int = 1800
    batch_tokens: int = 2048  # padded tokens per batch (about 40 answers)
    learning_rate: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 200
    checkpoint_every: int = 200
    max_minutes: float = 8.0  # training time cap; the LR schedule ends by then too; 0: none
    # An exponential moving average of the weights (decay per step), saved as the part in place of
    # the last step's weights; 0: none. The last step's weights stay in checkpoint/.
    average_decay: float = 0.0
    sentence_pieces: bool = True
    questions: bool = True  # every question phrasing of the fact base, said in the agent voice
    word_repeats: int = 0  # phrases in which each fact-base word is heard this often (0: none)
    answer_variants: int = 0  # per train answer: its key words or slot values swapped for another fact's
    phrase_words: tuple[int, int] = (2, 6)
    dropout: float = 0.0  # the decoder's input and attention dropout (EchoDecoderConfig.dropout)
    # Share of the previous-unit inputs blanked in training (Tacotron's pre-net dropout): the
    # decoder cannot lean on copying the unit before and must read the text.
    unit_dropout: float = 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> T2CSettings:
        kwargs = settings_kwargs(cls, values, "t2c")
        if "phrase_words" in kwargs:
            kwargs["phrase_words"] = tuple(kwargs["phrase_words"])
        settings = cls(**kwargs)
        if not (0.0 <= settings.dropout < 1.0 and 0.0 <= settings.unit_dropout < 1.0):
            raise EchoXError("t2c: dropout and unit_dropout must be in [0, 1)")
        if not 0.0 <= settings.average_decay < 1.0:
            raise EchoXError(f"t2c: average_decay must be in [0, 1), got {settings.average_decay}")
        return settings


@dataclasses.dataclass(frozen=True)
class T2CExample:
    """One training segment: text token ids and the unit-language tokens of its speech."""

    text_ids: tuple[int, ...]
    unit_tokens: tuple[int, ...]
    split: str  # "train" | "dev"
    source: str  # one of SOURCES


@dataclasses.dataclass(frozen=True)
class T2CBatch:
    input_ids: torch.Tensor  # [B, L] mixed ids: text < V_text <= unit
    attention_mask: torch.Tensor  # [B, L] 1 on real positions
    labels: torch.Tensor  # [B, L] next id at unit/stop targets, IGNORE_INDEX elsewhere


# --- data --------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """The segments a text is spoken in: one per sentence (after . ! ?), empty pieces dropped."""
    return [piece.strip() for piece in _SENTENCE_END.split(text.strip()) if piece.strip()]


def build_sequence(
    prefix_ids: Sequence[int],
    content_ids: Sequence[int],
    suffix_ids: Sequence[int],
    unit_tokens: Sequence[int],
    text_vocab_size: int,
    stop_id: int,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one segment. The position of the last suffix token predicts the
    first unit, each unit predicts the next, the last unit predicts `stop_id`; every other
    position is IGNORE_INDEX."""
    prompt = [*prefix_ids, *content_ids, *suffix_ids]
    units = [text_vocab_size + int(u) for u in unit_tokens]
    input_ids = prompt + units
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + units + [stop_id]
    return input_ids, labels


def collate(
    examples: Sequence[T2CExample], tokenizer: TextTokenizer, text_vocab_size: int
) -> T2CBatch:
    """Right-padded batch in the inference layout ([bos] text [eos] units, stop = eos)."""
    rows = [
        build_sequence(
            [tokenizer.bos_id], e.text_ids, [tokenizer.eos_id], e.unit_tokens, text_vocab_size, tokenizer.eos_id
        )
        for e in examples
    ]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(targets)
        mask[row, : len(ids)] = 1
    return T2CBatch(input_ids, mask, labels)


def answer_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The agent answers: synth's manifest line (text, voice) with the units stage's units."""
    pairs = answers_with_units(run_dir / "synth", run_dir / "units", "t2c")
    return [{**answer, "units": units["units"], "split": units["split"]} for answer, units in pairs]


def vocabulary_phrases(texts: Sequence[str], repeats: int, words: tuple[int, int], seed: int) -> list[str]:
    """Phrases of `words` (low, high) words in which every word of `texts` occurs `repeats`
    times, in random order and company (deterministic for a seed); each ends with a period,
    as sentences do."""
    vocab = sorted({w for text in texts for w in re.findall(r"[A-Za-z']+|\d+", text)})
    rng = random.Random(seed)
    phrases: list[str] = []
    for _ in range(max(0, repeats) if vocab else 0):
        order = rng.sample(vocab, len(vocab))
        while order:
            take = rng.randint(*words)
            phrases.append(" ".join(order[:take]) + ".")
            order = order[take:]
    return phrases


def cached_render(path: Path, texts: Sequence[str], render: UnitRenderer) -> dict[str, list[int]]:
    """Units of every text, rendering only those not already in `path` (a JSONL cache)."""
    cache = {row["text"]: row["units"] for row in read_jsonl(path, missing_ok=True)}
    missing = sorted({t for t in texts if t not in cache})
    if missing:
        for text, units in zip(missing, render(missing), strict=True):
            cache[text] = units
        write_jsonl(path, ({"text": t, "units": u} for t, u in sorted(cache.items())))
    return {text: cache[text] for text in texts}


@dataclasses.dataclass(frozen=True)
class FactTexts:
    """The fact base's text: its question phrasings, and every text whose words the LLM says."""

    questions: tuple[str, ...] = ()
    vocabulary: tuple[str, ...] = ()
    facts: tuple[Fact, ...] = ()

    @classmethod
    def load(cls, facts_dir: Path | None) -> FactTexts:
        if facts_dir is None:
            return cls()
        from training.text_data import corpus_texts, load_facts, load_templates, questions_for

        facts, templates = load_facts(facts_dir), load_templates(facts_dir)
        questions = dict.fromkeys(q for fact in facts for q in questions_for(fact, templates))
        return cls(tuple(questions), tuple(corpus_texts(facts, templates)), tuple(facts))


def extra_texts(
    rows: Sequence[dict[str, Any]], settings: T2CSettings, texts: FactTexts, seed: int
) -> list[tuple[str, str]]:
    """(text, source) of the training segments rendered here: each sentence of a multi-sentence
    TRAIN answer, every question phrasing, and the vocabulary phrases."""
    extra: list[tuple[str, str]] = []
    if settings.sentence_pieces:
        for row in rows:
            pieces = split_sentences(row["text"])
            if row["split"] == "train" and len(pieces) > 1:
                extra += [(piece, "sentence") for piece in pieces]
    if settings.questions:
        extra += [(question, "question") for question in texts.questions]
    phrases = vocabulary_phrases(texts.vocabulary, settings.word_repeats, settings.phrase_words, seed)
    variants = answer_variants(rows, texts.facts, settings.answer_variants, seed)
    return extra + [(phrase, "phrase") for phrase in phrases] + [(text, "variant") for text in variants]


def answer_variants(rows: Sequence[dict[str, Any]], facts: Sequence[Fact], per_answer: int, seed: int) -> list[str]:
    """Answer-shaped sentences: each TRAIN answer with its key words, or else its slot values,
    swapped for those of another fact of its category ("The capital of France is Rome."). The
    decoder hears every answer word in the places answers put it, and never a held-out answer:
    a variant equal to one is dropped. Deterministic for a seed."""
    by_id = {fact.id: fact for fact in facts}
    by_category: dict[str, list[Fact]] = {}
    for each in facts:
        by_category.setdefault(each.category, []).append(each)
    held_out = {row["text"] for row in rows if row["split"] != "train"}
    rng, variants = random.Random(seed + 17), dict[str, None]()
    for row in rows:
        fact = by_id.get(row.get("fact_id", ""))
        others = [f for f in by_category.get(fact.category, []) if f.id != fact.id] if fact else []
        if row["split"] != "train" or fact is None or not others:
            continue
        for _ in range(per_answer):
            other = rng.choice(others)
            if rng.random() < 0.5:
                text = swap_words(row["text"], fact.key, other.key)
            else:
                text = swap_words(row["text"], list(fact.slots.values()), [other.slots.get(k, "") for k in fact.slots])
            if text != row["text"] and text not in held_out:
                variants[text] = None
    return list(variants)


def swap_words(text: str, old: Sequence[str], new: Sequence[str]) -> str:
    """`text` with each whole-word `old[i]` replaced by `new[i]` (all at once, so swaps can't chain)."""
    pairs = {o: n for o, n in zip(old, new, strict=False) if o and n}
    if not pairs:
        return text
    pattern = re.compile(r"\b(" + "|".join(re.escape(o) for o in sorted(pairs, key=len, reverse=True)) + r")\b")
    return pattern.sub(lambda match: pairs[match.group(0)], text)


def build_examples(
    rows: Sequence[dict[str, Any]],
    tokenizer: TextTokenizer,
    codec: UnitLanguageCodec,
    extra: Sequence[tuple[str, str]],
    render: UnitRenderer | None,
    cache_path: Path,
) -> list[T2CExample]:
    """Whole answers (both splits, from the units stage) and the `extra` segments (train,
    rendered or read from the cache). `render` may be None only when `extra` is empty."""
    examples = [
        T2CExample(tuple(tokenizer.encode(r["text"])), tuple(codec.encode(r["units"])), r["split"], "answer")
        for r in rows
    ]
    if extra:
        if render is None:
            raise EchoXError("t2c: sentence pieces, questions or phrases need a unit renderer")
        units = cached_render(cache_path, [text for text, _ in extra], render)
        for text, source in extra:
            codes = tuple(codec.encode(units[text]))
            examples.append(T2CExample(tuple(tokenizer.encode(text)), codes, "train", source))
    return examples


# --- model and loss ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextSide:
    """What the T2C takes from the LLM stage: the tokenizer and the frozen input table."""

    tokenizer: TextTokenizer
    llm_config: LLMConfig
    table: torch.Tensor  # [V_text, H], no grad


def load_text_side(lm_dir: Path, chat: ChatFormat | None = None) -> TextSide:
    """The lm stage's tokenizer (in `chat`, else the prompt format saved beside it) and frozen
    input table."""
    tokenizer = TextTokenizer.load(lm_dir / "tokenizer.json", chat) if chat else load_lm_tokenizer(lm_dir)
    llm_config = read_part_config(lm_dir, "llm", LLMConfig)
    llm = build_llm(llm_config)
    load_part_weights(lm_dir, "llm", llm)
    embeddings = llm.get_input_embeddings()
    assert isinstance(embeddings, torch.nn.Embedding)
    return TextSide(tokenizer, llm_config, embeddings.weight.detach().clone())


def decoder_config(
    preset: str, llm_config: LLMConfig, codec: UnitLanguageCodec, dropout: float = 0.0
) -> EchoDecoderConfig:
    """The preset's echo decoder with the sizes learned by the earlier stages."""
    return get_preset(preset).echo_decoder.replace(
        text_vocab_size=llm_config.vocab_size,
        text_dim=llm_config.hidden_size,
        unit_vocab_size=codec.vocab_size,
        dropout=dropout,
    )


def new_decoder(config: EchoDecoderConfig, table: torch.Tensor) -> EchoDecoder:
    """A fresh decoder whose unit rows start at the text rows' scale (the adapter sees one scale)."""
    decoder = EchoDecoder(config)
    with torch.no_grad():
        decoder.unit_embed.weight.normal_(0.0, float(table.std()))
    return decoder


def batch_loss(
    decoder: EchoDecoder, batch: T2CBatch, table: torch.Tensor, unit_dropout: float = 0.0
) -> tuple[torch.Tensor, int, int]:
    """Mean CE over unit/stop targets; also (correct, count) of argmax over the ids inference
    may choose (unit ids and the stop id). `unit_dropout`: share of unit inputs zeroed."""
    input_ids = batch.input_ids.to(table.device)
    embeds = blank_units(decoder.embed(input_ids, table), input_ids >= decoder.config.text_vocab_size, unit_dropout)
    logits, _ = decoder(embeds, attention_mask=batch.attention_mask.to(table.device))
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = batch.labels.reshape(-1).to(table.device)
    loss = torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        keep = flat_labels != IGNORE_INDEX
        chosen = allowed_argmax(decoder, flat_logits[keep], flat_labels[keep])
        correct = int((chosen == flat_labels[keep]).sum())
    return loss, correct, int(keep.sum())


def blank_units(embeds: torch.Tensor, is_unit: torch.Tensor, share: float) -> torch.Tensor:
    """`embeds` with about `share` of the unit positions (`is_unit`, [B, L]) set to zero."""
    if share <= 0.0:
        return embeds
    blank = is_unit & (torch.rand(is_unit.shape, device=embeds.device) < share)
    return embeds.masked_fill(blank.unsqueeze(-1), 0.0)


def allowed_argmax(decoder: EchoDecoder, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Argmax restricted to what generation may choose: unit ids and the stop id (the stop id is
    the one text-id label)."""
    stop_ids = labels[labels < decoder.config.text_vocab_size].unique()
    return (logits.float() + decoder.allowed_ids(stop_ids, logits.device)).argmax(-1)


@torch.no_grad()
def evaluate(
    decoder: EchoDecoder,
    examples: Sequence[T2CExample],
    tokenizer: TextTokenizer,
    table: torch.Tensor,
    batch_tokens: int,
) -> dict[str, float]:
    """Teacher-forced dev loss and unit-token accuracy (stop included) over `examples`."""
    was_training = decoder.training
    decoder.eval()
    total_loss, total_correct, total_count = 0.0, 0, 0
    for indices in token_batches([sequence_length(e) for e in examples], batch_tokens):
        batch = collate([examples[i] for i in indices], tokenizer, decoder.config.text_vocab_size)
        loss, correct, count = batch_loss(decoder, batch, table)
        total_loss += float(loss) * count
        total_correct += correct
        total_count += count
    decoder.train(was_training)
    count = max(total_count, 1)
    return {"dev_loss": total_loss / count, "dev_accuracy": total_correct / count}


def sequence_length(example: T2CExample) -> int:
    return len(example.text_ids) + 2 + len(example.unit_tokens)  # + bos and eos


def token_batches(lengths: Sequence[int], batch_tokens: int, rng: random.Random | None = None) -> list[list[int]]:
    """Groups examples of similar length so that (longest × count) stays within `batch_tokens`:
    little padding, and a step costs about the same whatever the lengths. With `rng` the
    lengths are jittered (batches differ from epoch to epoch) and the batch order shuffled."""
    jitter = (lambda: rng.random() * 8.0) if rng is not None else (lambda: 0.0)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] + jitter())
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        if current and max(width, lengths[index]) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, width = [], 0
        current.append(index)
        width = max(width, lengths[index])
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def training_batches(lengths: Sequence[int], batch_tokens: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Endless epochs of token batches, each epoch drawn from a generator seeded by (seed, epoch),
    starting at batch `start_step`: a resumed run sees exactly the batches of an unbroken one."""
    step, epoch = 0, 0
    while True:
        for batch in token_batches(lengths, batch_tokens, random.Random(seed * 1_000_003 + epoch)):
            if step >= start_step:
                yield batch
            step += 1
        epoch += 1


# --- training ----------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    step: int
    train_loss: float | None  # mean of the last 20 steps (None when resumed at the end)
    dev: dict[str, float]
    stopped_early: bool


def train_decoder(
    ctx: StageContext,
    decoder: EchoDecoder,
    examples: Sequence[T2CExample],
    text: TextSide,
    settings: T2CSettings,
) -> TrainResult:
    """AdamW with warmup + cosine over steps or `max_minutes` of training, whichever ends first;
    resumes from `checkpoint/`, evaluates on dev every `eval_every` steps, checkpoints every
    `checkpoint_every` steps and at the end. With `average_decay` the decoder leaves with the
    averaged weights, and the last step's dev figures are kept beside theirs."""
    train = [e for e in examples if e.split == "train"]
    dev = [e for e in examples if e.split == "dev"]
    if not train:
        raise EchoXError("t2c: no training examples")
    optimizer = torch.optim.AdamW(
        [p for p in decoder.parameters() if p.requires_grad],
        lr=settings.learning_rate, betas=(0.9, 0.98), weight_decay=settings.weight_decay,
    )
    state_dir = ctx.out / CHECKPOINT_DIR
    average = WeightAverage(decoder, settings.average_decay) if settings.average_decay else None
    step, extra = load_training_state(state_dir, decoder, optimizer, average)
    batches = training_batches([sequence_length(e) for e in train], settings.batch_tokens, ctx.seed, step)
    metrics = MetricsLog(ctx.out)
    ctx.reporter.start(ctx.stage, settings.steps)
    ctx.reporter.advance(step)
    elapsed_before, started, recent = float(extra.get("elapsed_s", 0.0)), time.perf_counter(), list[float]()
    elapsed = elapsed_before
    progress = schedule_progress(step, settings.steps, elapsed, settings.max_minutes)
    decoder.train()
    while progress < 1.0:
        ctx.check_cancelled()
        factor = warmup_cosine(step, settings.warmup_steps, progress, settings.min_lr_ratio)
        set_learning_rate(optimizer, settings.learning_rate * factor)
        chosen = [train[i] for i in next(batches)]
        batch = collate(chosen, text.tokenizer, decoder.config.text_vocab_size)
        loss, _, _ = batch_loss(decoder, batch, text.table, settings.unit_dropout)
        optimizer_step(optimizer, loss, decoder.parameters(), settings.grad_clip)
        if average is not None:
            average.update(decoder)
        step += 1
        elapsed = elapsed_before + time.perf_counter() - started
        progress = schedule_progress(step, settings.steps, elapsed, settings.max_minutes)
        value = float(loss.detach())
        recent = [*recent, value][-20:]
        metrics.add(step, loss=value)
        ctx.reporter.advance(1, loss=value)
        if dev and step % settings.eval_every == 0 and progress < 1.0:
            figures = evaluate(decoder, dev, text.tokenizer, text.table, settings.batch_tokens)
            metrics.add(step, **figures)
            ctx.reporter.log(f"t2c step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in figures.items()))
        if step % settings.checkpoint_every == 0:
            save_training_state(state_dir, decoder, optimizer, step, {"elapsed_s": elapsed}, average)
            metrics.save()
    stopped_early = step < settings.steps
    if stopped_early:
        ctx.reporter.log(f"t2c: time budget of {settings.max_minutes} min reached at step {step}")
    save_training_state(state_dir, decoder, optimizer, step, {"elapsed_s": elapsed}, average)
    dev_figures = evaluate(decoder, dev, text.tokenizer, text.table, settings.batch_tokens) if dev else {}
    if average is not None:
        metrics.set(**{f"last_step_{name}": value for name, value in dev_figures.items()})
        average.copy_to(decoder)
        dev_figures = evaluate(decoder, dev, text.tokenizer, text.table, settings.batch_tokens) if dev else {}
    metrics.add(step, **dev_figures)
    metrics.set(final_step=step, stopped_early=stopped_early, **dev_figures)
    metrics.save()
    train_loss = sum(recent) / len(recent) if recent else None
    return TrainResult(step, train_loss, dev_figures, stopped_early)


def spoken_in_voice(texts: Sequence[str], voice: str, rate: int, pitch: int) -> Iterator[FloatArray]:
    """`texts` said by espeak-ng in one voice, in order, two at a time (espeak-ng runs as a
    subprocess, so threads overlap it)."""
    from echox.espeak import speak

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield from pool.map(lambda text: speak(text, voice, rate, pitch), texts)


def espeak_renderer(units_dir: Path, voice: str, rate: int, pitch: int) -> UnitRenderer:
    """Renders texts with espeak-ng in one voice and assigns units with the units stage's
    k-means (loaded on first use: a resumed run whose pieces are all cached never loads it)."""

    def render(texts: Sequence[str]) -> list[list[int]]:
        from training.features import UnitExtractor

        extractor = UnitExtractor.load(units_dir)
        return [extractor.dedup_units(audio) for audio in spoken_in_voice(texts, voice, rate, pitch)]

    return render


def run(ctx: StageContext) -> dict[str, Any]:
    """The `t2c` stage; settings: see T2CSettings."""
    settings = T2CSettings.from_mapping(ctx.settings)
    torch.manual_seed(ctx.seed)
    text = load_text_side(ctx.input("lm"))
    codec = UnitLanguageCodec.load(ctx.input("unit_language") / "unit_language.json")
    rows = answer_rows(ctx.run_dir)
    agent = rows[0]  # every answer is in the one agent voice
    render = espeak_renderer(ctx.input("units"), agent["voice"], int(agent["rate"]), int(agent["pitch"]))
    extra = extra_texts(rows, settings, FactTexts.load(ctx.facts), ctx.seed)
    ctx.reporter.log(f"t2c: {len(rows)} answers and {len(extra)} rendered segments")
    examples = build_examples(rows, text.tokenizer, codec, extra, render, ctx.out / PIECES_FILE)
    config = decoder_config(ctx.preset, text.llm_config, codec, settings.dropout)
    device = ctx.parallel.device  # a GPU under torchrun when there is one (the large presets)
    text = dataclasses.replace(text, table=text.table.to(device))
    decoder = new_decoder(config, text.table).to(device)
    result = train_decoder(ctx, decoder, examples, text, settings)
    save_part(ctx.out, PART_NAME, decoder.cpu(), config)
    return _summary(result, examples, decoder)


def _summary(result: TrainResult, examples: Sequence[T2CExample], decoder: EchoDecoder) -> dict[str, Any]:
    train = [e for e in examples if e.split == "train"]
    ratios = [len(e.unit_tokens) / (len(e.text_ids) + 2) for e in train]  # +2: bos and eos
    return {
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "train_loss": None if result.train_loss is None else round(result.train_loss, 4),
        **{name: round(value, 4) for name, value in result.dev.items()},
        "train_examples": {s: sum(e.source == s for e in train) for s in SOURCES},
        "dev_examples": len(examples) - len(train),
        "max_unit_tokens_per_input": round(max(ratios), 2),
        "parameters": sum(p.numel() for p in decoder.parameters()),
    }
