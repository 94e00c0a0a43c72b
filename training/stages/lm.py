"""Stage `lm`: the tiny LLM learns the fact base as text (our stand-in for a pretrained LLM).

It learns a byte-level BPE on the corpus, then trains the preset's LLM on chat-formatted
question/answer conversations with cross-entropy on the answer tokens only. The learning rate
warms up, then follows a cosine whose progress is the larger of steps done / `steps` and wall
time / `time_limit_s`, so a busy machine ends the stage on time with a fully decayed rate
instead of overrunning. At the end it greedy-decodes every fact's first question and reports
exact-match and key-word accuracy (alone and after an earlier turn).

With `import: PATH` (a local Hugging Face Llama folder: config.json, model.safetensors or shards,
tokenizer.json, optional tokenizer_config.json; a relative PATH lies under the data root,
ECHOX_DATA_ROOT) it trains nothing: that LLM and its tokenizer
become the stage's outputs. The tokenizer gains the special tokens our prompt needs
(`<audio_patch>`, ...) and the LLM rows for them, initialised to the mean embedding; the prompt
is Llama-3's own chat format when the tokenizer has its header tokens, else ours.

Outputs (RUN/lm/): tokenizer.json, chat.json (its prompt format), llm.safetensors + llm.json,
and when trained metrics.json, loss.png and checkpoint/ (resume state).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from echox.checkpoint import save_part
from echox.convert.files import load_safetensors, read_json, safetensors_files
from echox.convert.official import (
    LLM_HEAD,
    LLM_TABLE,
    llama3_pad,
    llm_config_from_official,
)
from echox.errors import ConfigError, EchoXError, ModelLoadError
from echox.models.llm import LLMConfig, build_llm
from echox.models.presets import get_preset
from echox.tokenizer import ChatFormat, TextTokenizer, Turn
from training.judge import has_key_words
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
CHAT_FILE = "chat.json"  # the prompt format of tokenizer.json (ChatFormat fields)
CHECKPOINT_DIR = "checkpoint"
LLAMA3_CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPECIAL_TOKEN = re.compile(r"<[^<>\s]+>")  # one marker such as <|user|>, not text around several
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
    import_dir: str = ""  # `import: PATH`: a local HF Llama folder (relative: under the data root), not trained

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LMSettings:
        settings = cls(**settings_kwargs(cls, import_setting(values), "settings.lm"))
        overrides = settings_kwargs(LLMConfig, settings.llm_overrides, "settings.lm.llm_overrides")
        if "vocab_size" in overrides:
            raise ConfigError("settings.lm.llm_overrides: vocab_size follows the tokenizer (settings.lm.vocab_size)")
        if settings.import_dir and overrides:
            raise ConfigError("settings.lm: llm_overrides shape a model trained from scratch, not an imported one")
        return settings


def import_setting(values: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's settings with the recipe's `import` key as `import_dir` (`import` is a Python
    keyword, so the settings field has another name)."""
    renamed = dict(values)
    if "import" in renamed:
        renamed["import_dir"] = str(renamed.pop("import") or "")
    return renamed


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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
        return load_lm_tokenizer(ctx.out)
    tokenizer = train_text_tokenizer(texts, settings.vocab_size, ChatFormat(), settings.min_frequency)
    tokenizer.save(path)
    save_chat_format(ctx.out, tokenizer.chat)
    return tokenizer


def save_chat_format(folder: Path, chat: ChatFormat) -> None:
    (folder / CHAT_FILE).write_text(json.dumps(chat.to_dict(), indent=2) + "\n")


def load_lm_tokenizer(lm_dir: Path) -> TextTokenizer:
    """RUN/lm's tokenizer in the prompt format saved beside it (a run without chat.json: ours)."""
    path = Path(lm_dir) / CHAT_FILE
    chat = ChatFormat.from_dict(read_json(path)) if path.is_file() else ChatFormat()
    return TextTokenizer.load(Path(lm_dir) / TOKENIZER_FILE, chat)


def llm_config_for(ctx: StageContext, tokenizer: TextTokenizer, overrides: Mapping[str, Any]) -> LLMConfig:
    llm: LLMConfig = get_preset(ctx.preset).llm
    return llm.replace(**overrides, vocab_size=round_up(tokenizer.vocab_size, VOCAB_MULTIPLE))


# --- importing a pretrained LLM -------------------------------------------------------------


def llama3_chat_format(tokenizer: Tokenizer, tokenizer_config: Mapping[str, Any]) -> ChatFormat:
    """Llama-3 Instruct's own prompt (its chat template, no system block): header, blank line,
    message, <|eot_id|>. Not the release's variant (official_chat_format), whose extra
    <|begin_of_text|> ids come from its tokenizer adding one to every string."""
    eos = "<|eot_id|>"  # the end of a turn, whatever tokenizer_config calls eos (base models: end_of_text)

    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    return ChatFormat(
        bos="<|begin_of_text|>",
        eos=eos,
        user_prefix=header("user"),
        user_suffix=eos,
        assistant_prefix=header("assistant"),
        assistant_suffix=eos,
        pad=llama3_pad(tokenizer, tokenizer_config, eos),
    )


def import_folder(value: str) -> Path:
    """An `import:` setting's folder: a relative path lies under the data root (ECHOX_DATA_ROOT),
    where the recipes keep their data; an absolute one is taken as it is."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    from services.common.settings import get_settings  # pydantic settings: only when importing

    return get_settings().data_root / path


def check_llm_folder(folder: Path) -> None:
    """One error naming everything the HF folder lacks."""
    if not folder.is_dir():
        raise ModelLoadError(f"settings.lm.import: no HF LLM folder at {folder}")
    problems = [f"{name} is missing" for name in ("config.json", TOKENIZER_FILE) if not (folder / name).is_file()]
    try:
        safetensors_files(folder, "LLM")
    except ModelLoadError as exc:
        problems.append(str(exc))
    if problems:
        raise ModelLoadError(f"settings.lm.import: {folder} is not a HF causal-LM folder: {'; '.join(problems)}")


def import_tokenizer(folder: Path) -> tuple[TextTokenizer, list[str]]:
    """The folder's tokenizer with the special tokens our prompt lacks added after its last id,
    and those tokens. Llama-3's chat format when it has the header tokens, else ours."""
    path = folder / TOKENIZER_FILE
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
        raise ModelLoadError(f"cannot read tokenizer {path}: {exc}") from None
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = read_json(config_path) if config_path.is_file() else {}
    llama3 = all(backend.token_to_id(token) is not None for token in LLAMA3_CHAT_TOKENS)
    chat = llama3_chat_format(backend, tokenizer_config) if llama3 else ChatFormat()
    # Llama-3's role markers are text around its specials; only single-token markers are added.
    added = [t for t in chat.special_tokens() if SPECIAL_TOKEN.fullmatch(t) and backend.token_to_id(t) is None]
    backend.add_special_tokens(added)
    try:
        return TextTokenizer(backend, chat), added
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def grown_rows(table: torch.Tensor, rows: int, new_ids: Sequence[int]) -> torch.Tensor:
    """`table` grown to `rows` rows; the new rows and those of `new_ids` (tokens just added) are
    the mean of the original rows, so a new token starts as an average one, not as noise."""
    if rows == table.shape[0] and not new_ids:
        return table
    mean = table.float().mean(dim=0).to(table.dtype)
    grown = torch.cat([table, mean.expand(rows - table.shape[0], -1)])
    grown[list(new_ids)] = mean
    return grown


def import_llm(folder: Path, tokenizer: TextTokenizer, added: Sequence[str]) -> tuple[PreTrainedModel, LLMConfig]:
    """The folder's Llama (weights in their stored dtype, no copy) with rows for the added tokens."""
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") != "llama":
        raise ModelLoadError(f"{folder}: model_type {cfg.get('model_type')!r} is not 'llama' (the family imported)")
    tensors = {k: v for k, v in load_safetensors(safetensors_files(folder, "LLM")).items()
               if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints saved RoPE tables
    try:
        config = llm_config_from_official(cfg, tensors)
    except (EchoXError, KeyError, TypeError, ValueError) as exc:
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {reason}") from None
    if LLM_TABLE not in tensors:
        raise ModelLoadError(f"{folder}: the weights lack {LLM_TABLE}")
    ids = tokenizer.backend.get_vocab(with_added_tokens=True)
    known = 1 + max(i for token, i in ids.items() if token not in added)
    if known > config.vocab_size:
        raise ModelLoadError(f"{folder}: tokenizer.json has ids up to {known - 1}, the LLM {config.vocab_size} rows")
    vocab = max(config.vocab_size, round_up(1 + max(ids.values()), VOCAB_MULTIPLE))
    new_ids = [tokenizer.special_id(token) for token in added]
    tensors[LLM_TABLE] = grown_rows(tensors[LLM_TABLE], vocab, new_ids)
    head = tensors[LLM_TABLE] if config.tie_word_embeddings else grown_rows(tensors[LLM_HEAD], vocab, new_ids)
    tensors[LLM_HEAD] = head
    config = config.replace(vocab_size=vocab)
    with torch.device("meta"):  # the loaded tensors become the weights: no random init, no copy
        model = build_llm(config)
    load_weights(model, tensors, folder)
    if config.tie_word_embeddings:
        model.tie_weights()  # one parameter again (assign made two of the same tensor)
    return model, config


def load_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], folder: Path) -> None:
    """`tensors` as the weights of `model` (built on the meta device: assigned, not copied); a
    ModelLoadError naming what does not fit the folder's config.json."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    problem = f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else ""
    if not problem:
        try:
            model.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:  # shapes that disagree with config.json
            problem = str(exc).strip().splitlines()[-1].strip()
    if problem:
        raise ModelLoadError(f"{folder}: the weights do not fit its config.json: {problem}")


def import_run(ctx: StageContext, settings: LMSettings) -> dict[str, Any]:
    """The `import` path: converts the HF folder into this stage's outputs, training nothing."""
    folder = import_folder(settings.import_dir)
    check_llm_folder(folder)
    ctx.reporter.start("lm", 1, "model")
    tokenizer, added = import_tokenizer(folder)
    model, config = import_llm(folder, tokenizer, added)
    save_part(ctx.out, "llm", model, config)
    tokenizer.save(ctx.out / TOKENIZER_FILE)
    save_chat_format(ctx.out, tokenizer.chat)
    ctx.reporter.advance(1)
    ctx.reporter.log(f"lm: imported {folder}, added tokens {added}")
    return {
        "imported": str(folder),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "model_vocab_size": config.vocab_size,
        "added_tokens": added,
        "chat_format": "echox" if tokenizer.chat == ChatFormat() else "llama3",
    }


def train_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, torch.Tensor],
    lr: float,
    settings: LMSettings,
) -> tuple[float, float]:
    set_learning_rate(optimizer, lr)
    loss, token_accuracy = answer_loss(model, batch)
    optimizer_step(optimizer, loss, model.parameters(), settings.grad_clip)
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
    progress = schedule_progress(step, settings.steps, elapsed, settings.time_limit_s / 60)
    window: list[tuple[float, float]] = []  # (loss, token accuracy) since the last logged point
    model.train()
    while progress < 1.0:
        ctx.check_cancelled()
        batch = pad_batch([examples[i] for i in schedule.indices(step)], pad_id)
        lr = settings.lr * warmup_cosine(step, settings.warmup, progress, settings.min_lr_ratio)
        loss_value, token_accuracy = train_step(model, optimizer, batch, lr, settings)
        step += 1
        elapsed = elapsed_before + time.perf_counter() - started
        progress = schedule_progress(step, settings.steps, elapsed, settings.time_limit_s / 60)
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
    torch.set_num_threads(settings.threads)
    if settings.import_dir:
        return import_run(ctx, settings)
    if ctx.facts is None:
        raise ConfigError("stage lm needs the fact base (the recipe's `facts`)")
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
