"""Stage `lm`: the tiny LLM learns the fact base as text (our stand-in for a pretrained LLM).

It learns a byte-level BPE on the corpus, then trains the preset's LLM on chat-formatted
question/answer conversations with cross-entropy on the answer tokens only. The learning rate
warms up, then follows a cosine whose progress is the larger of steps done / `steps` and wall
time / `time_limit_s`, so a busy machine ends the stage on time with a fully decayed rate
instead of overrunning. At the end it greedy-decodes every fact's first question and reports
exact-match and key-word accuracy (alone and after an earlier turn).

Outputs (RUN/lm/): tokenizer.json, llm.safetensors + llm.json, metrics.json, loss.png, and
checkpoint/ (resume state).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from echox.checkpoint import save_part
from echox.errors import ConfigError
from echox.models.llm import LLMConfig, build_llm
from echox.models.presets import get_preset
from echox.tokenizer import ChatFormat, TextTokenizer, Turn
from training.judge import has_key_words
from training.stage import MetricsLog, StageContext, load_training_state, save_training_state, settings_kwargs
from training.text_data import (
    IGNORE_INDEX,
    ChatExample,
    Fact,
    build_conversations,
    corpus_texts,
    encode_conversation,
    load_facts,
    load_templates,
    pad_batch,
    questions_for,
    text_prompt_ids,
    train_text_tokenizer,
)

TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoint"
VOCAB_MULTIPLE = 64  # the model's vocabulary is the tokenizer's, rounded up (spare rows are never used)


@dataclasses.dataclass(frozen=True)
class LMSettings:
    """`settings.lm` of a recipe. Unknown keys are an error, so a typo never goes unnoticed."""

    vocab_size: int = 512  # BPE target; small, so held-out answers reuse pieces the T2C has seen
    min_frequency: int = 2
    steps: int = 800
    batch_size: int = 16  # small batches, many updates: the facts are memorised sooner
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 40
    weight_decay: float = 0.01
    adam_beta2: float = 0.95  # shorter second-moment memory: steadier at this learning rate
    grad_clip: float = 1.0
    history_share: float = 0.5  # share of questions also trained after another fact's turn
    time_limit_s: float = 280.0  # training wall-time cap (0 = none); setup and evaluation take ~15 s more
    checkpoint_every: int = 100
    log_every: int = 10
    threads: int = 1  # 2 OpenMP threads run ~5x slower than 1 when other jobs share the 2 cores
    limit_facts: int = 0  # 0 = all facts (tests use a handful)
    eval_batch_size: int = 64
    max_answer_tokens: int = 96
    llm_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # LLMConfig fields to change

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LMSettings:
        return cls(**settings_kwargs(cls, values, "settings.lm"))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def lr_at(settings: LMSettings, step: int, progress: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr down to min_lr_ratio·lr."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    floor = settings.lr * settings.min_lr_ratio
    return floor + (settings.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def training_progress(settings: LMSettings, step: int, elapsed_s: float) -> float:
    by_steps = step / settings.steps
    by_time = elapsed_s / settings.time_limit_s if settings.time_limit_s > 0 else 0.0
    return max(by_steps, by_time)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A shuffled epoch in batches of similar length (little padding), fixed by seed and epoch."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 4  # small pools: batches stay mixed across categories
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class BatchSchedule:
    """The batch of any step, so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, examples: Sequence[ChatExample], batch_size: int, seed: int) -> None:
        self.lengths = [len(e.input_ids) for e in examples]
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = len(epoch_batches(self.lengths, batch_size, seed, 0))
        self._epoch, self._batches = 0, epoch_batches(self.lengths, batch_size, seed, 0)

    def indices(self, step: int) -> list[int]:
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.lengths, self.batch_size, self.seed, epoch)
        return self._batches[step % self.per_epoch]


def answer_loss(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Mean CE over answer tokens (labels != -100) and the share of them predicted exactly."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    hits = (logits.argmax(-1) == targets) & scored
    return loss, float(hits.sum()) / max(1, int(scored.sum()))


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, tokenizer: TextTokenizer, prompts: Sequence[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy answers for a batch of prompts (left-padded, KV cache), each up to its end marker."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    answers: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    next_pos = positions[:, -1:] + 1
    for _ in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        finished |= tokens == tokenizer.eos_id
        for row in torch.nonzero(~finished).flatten().tolist():
            answers[row].append(int(tokens[row]))
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
        out = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, cache=out.cache, use_cache=True
        )
        next_pos = next_pos + 1
    return answers


def evaluate_facts(
    model: PreTrainedModel,
    tokenizer: TextTokenizer,
    facts: Sequence[Fact],
    templates: dict[str, list[str]],
    settings: LMSettings,
    with_history: bool = False,
) -> dict[str, Any]:
    """Exact-match and key-word accuracy of the greedy answer to each fact's first question;
    with_history puts the next fact's first turn before it."""
    prompts, wrong = [], []
    for i, fact in enumerate(facts):
        history: tuple[Turn, ...] = ()
        if with_history and len(facts) > 1:
            other = facts[(i + 1) % len(facts)]
            history = (Turn(questions_for(other, templates)[0], other.answer),)
        prompts.append(text_prompt_ids(tokenizer, questions_for(fact, templates)[0], history))
    exact = keyed = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(facts), settings.eval_batch_size):
        chunk = slice(start, start + settings.eval_batch_size)
        for fact, ids in zip(facts[chunk], greedy_answers(model, tokenizer, prompts[chunk], settings.max_answer_tokens),
                             strict=True):
            text = tokenizer.decode(ids).strip()
            correct = has_key_words(text, fact.key)
            exact += text == fact.answer
            keyed += correct
            if not correct:
                wrong.append({"fact_id": fact.id, "expected": fact.answer, "got": text})
    model.train(was_training)
    n = max(1, len(facts))
    return {"exact_match": exact / n, "key_word_accuracy": keyed / n, "wrong": wrong[:20]}


# --- the stage ------------------------------------------------------------------------------


def learn_or_load_tokenizer(ctx: StageContext, settings: LMSettings, texts: Sequence[str]) -> TextTokenizer:
    """The tokenizer of this run: learned once and saved first, so a resumed run reuses it."""
    path = ctx.out / TOKENIZER_FILE
    if path.is_file():
        return TextTokenizer.load(path, ChatFormat())
    tokenizer = train_text_tokenizer(texts, settings.vocab_size, ChatFormat(), settings.min_frequency)
    tokenizer.save(path)
    return tokenizer


def llm_config_for(ctx: StageContext, tokenizer: TextTokenizer, overrides: Mapping[str, Any]) -> LLMConfig:
    llm: LLMConfig = get_preset(ctx.preset).llm
    return llm.replace(**overrides, vocab_size=round_up(tokenizer.vocab_size, VOCAB_MULTIPLE))


def optimizer_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, torch.Tensor],
    lr: float,
    settings: LMSettings,
) -> tuple[float, float]:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, token_accuracy = answer_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    return loss.item(), token_accuracy


def train_steps(
    ctx: StageContext,
    settings: LMSettings,
    model: PreTrainedModel,
    examples: Sequence[ChatExample],
    pad_id: int,
) -> dict[str, Any]:
    """The training loop, resumed from RUN/lm/checkpoint when one is there."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, settings.adam_beta2), weight_decay=settings.weight_decay
    )
    checkpoint = ctx.out / CHECKPOINT_DIR
    # save_training_state cannot write tied tensors twice; with tied embeddings the base model
    # holds every weight (lm_head is the same tensor as embed_tokens).
    state_module = model.model if model.config.tie_word_embeddings else model
    step, extra = load_training_state(checkpoint, state_module, optimizer)
    elapsed_before = float(extra.get("elapsed_s", 0.0))
    metrics = MetricsLog(ctx.out)
    for name in metrics.curves:  # points logged after the checkpoint will be logged again
        metrics.curves[name] = [p for p in metrics.curves[name] if p[0] <= step]
    schedule = BatchSchedule(examples, settings.batch_size, ctx.seed)
    ctx.reporter.start("lm", settings.steps, "steps")
    ctx.reporter.advance(step)
    if step:
        ctx.reporter.log(f"lm: resuming at step {step}")
    started = time.perf_counter()
    loss_value, elapsed = float(extra.get("loss", "nan")), elapsed_before
    progress = training_progress(settings, step, elapsed)
    window: list[tuple[float, float]] = []  # (loss, token accuracy) since the last logged point
    model.train()
    while progress < 1.0:
        ctx.check_cancelled()
        batch = pad_batch([examples[i] for i in schedule.indices(step)], pad_id)
        loss_value, token_accuracy = optimizer_step(model, optimizer, batch, lr_at(settings, step, progress), settings)
        step += 1
        elapsed = elapsed_before + time.perf_counter() - started
        progress = training_progress(settings, step, elapsed)
        window.append((loss_value, token_accuracy))
        if step % settings.log_every == 0 or progress >= 1.0:
            losses, accuracies = zip(*window, strict=True)
            metrics.add(step, loss=sum(losses) / len(window), answer_token_accuracy=sum(accuracies) / len(window))
            window.clear()
        ctx.reporter.advance(1, loss=loss_value, lr=optimizer.param_groups[0]["lr"])
        if step % settings.checkpoint_every == 0 or progress >= 1.0:
            save_training_state(checkpoint, state_module, optimizer, step, {"elapsed_s": elapsed, "loss": loss_value})
            metrics.save()
    return {
        "steps_done": step,
        "final_loss": loss_value,
        "train_seconds": round(elapsed, 1),
        "stopped_by_time": step < settings.steps,
    }


def run(ctx: StageContext) -> dict[str, Any]:
    settings = LMSettings.from_mapping(ctx.settings)
    if ctx.facts is None:
        raise ConfigError("stage lm needs the fact base (the recipe's `facts`)")
    torch.set_num_threads(settings.threads)
    facts, templates = load_facts(ctx.facts), load_templates(ctx.facts)
    if settings.limit_facts:
        facts = facts[: settings.limit_facts]
    tokenizer = learn_or_load_tokenizer(ctx, settings, corpus_texts(facts, templates))
    conversations = build_conversations(facts, templates, settings.history_share, ctx.seed)
    examples = [encode_conversation(tokenizer, c) for c in conversations]
    llm_config = llm_config_for(ctx, tokenizer, settings.llm_overrides)
    torch.manual_seed(ctx.seed)
    model = build_llm(llm_config)
    ctx.reporter.log(f"lm: {len(examples)} conversations, vocabulary {tokenizer.vocab_size} → {llm_config.vocab_size}")
    trained = train_steps(ctx, settings, model, examples, tokenizer.pad_id)
    alone = evaluate_facts(model, tokenizer, facts, templates, settings)
    after_turn = evaluate_facts(model, tokenizer, facts, templates, settings, with_history=True)
    save_part(ctx.out, "llm", model, llm_config)
    metrics = MetricsLog(ctx.out)
    metrics.set(evaluation=alone, evaluation_with_history=after_turn)
    metrics.save()
    return {
        **trained,
        "facts": len(facts),
        "conversations": len(examples),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "model_vocab_size": llm_config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "exact_match": alone["exact_match"],
        "key_word_accuracy": alone["key_word_accuracy"],
        "key_word_accuracy_with_history": after_turn["key_word_accuracy"],
    }
