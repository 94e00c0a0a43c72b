"""The LLM text stage: corpus, tokenizer, answer masking, greedy evaluation, outputs and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from echox.checkpoint import load_part_weights, read_part_config
from echox.models.llm import LLMConfig, build_llm
from echox.tokenizer import ChatFormat, TextTokenizer, Turn
from training.stage import DONE_FILE, StageCancelled, StageContext, run_stage, schedule_progress, warmup_cosine
from training.stages import lm
from training.text_data import (
    IGNORE_INDEX,
    Conversation,
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

FACTS = Path(__file__).resolve().parents[2] / "data" / "spoken_qa"
MICRO_LLM: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 1,
}
SMOKE_SETTINGS: dict[str, Any] = {
    "limit_facts": 6,
    "steps": 4,
    "warmup": 1,
    "batch_size": 8,
    "checkpoint_every": 2,
    "log_every": 1,
    "threads": 1,
    "time_limit_s": 0,
    "max_answer_tokens": 8,
    "llm_overrides": MICRO_LLM,
}


@pytest.fixture(scope="module")
def fact_base() -> tuple[list[Any], dict[str, list[str]]]:
    return load_facts(FACTS), load_templates(FACTS)


@pytest.fixture(scope="module")
def tokenizer(fact_base: tuple[list[Any], dict[str, list[str]]]) -> TextTokenizer:
    facts, templates = fact_base
    return train_text_tokenizer(corpus_texts(facts, templates), 512)


def test_every_fact_and_phrasing_is_in_the_corpus(fact_base: tuple[list[Any], dict[str, list[str]]]) -> None:
    facts, templates = fact_base
    conversations = build_conversations(facts, templates, history_share=1.0, seed=0)
    single = {(c.fact_id, c.question) for c in conversations if not c.history}
    expected = {(f.id, q) for f in facts for q in questions_for(f, templates)}
    assert single == expected
    assert len(expected) == sum(len(templates[f.category]) for f in facts)
    with_history = [c for c in conversations if c.history]
    assert len(with_history) == len(expected)
    assert all(c.history[0].assistant != c.answer or c.history[0].user != c.question for c in with_history)
    assert questions_for(facts[0], templates)[0] == "What is the capital of France?"


def test_conversations_are_deterministic(fact_base: tuple[list[Any], dict[str, list[str]]]) -> None:
    facts, templates = fact_base
    assert build_conversations(facts[:20], templates, seed=3) == build_conversations(facts[:20], templates, seed=3)


def test_tokenizer_has_the_chat_specials_and_a_one_token_period(tokenizer: TextTokenizer) -> None:
    chat = ChatFormat()
    assert all(tokenizer.backend.token_to_id(t) is not None for t in chat.special_tokens())
    assert tokenizer.encode(".") == [tokenizer.period_id]
    assert tokenizer.encode("Paris.")[-1] == tokenizer.period_id
    assert tokenizer.vocab_size <= 512
    TextTokenizer(tokenizer.backend, chat)  # constructs: all checks of the chat format pass


def test_tokenizer_round_trips_and_never_emits_specials_from_text(
    fact_base: tuple[list[Any], dict[str, list[str]]], tokenizer: TextTokenizer
) -> None:
    facts, templates = fact_base
    for text in [*corpus_texts(facts[::7], templates), "Zürich costs 5 € — ok?", "<|end|> is text here"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_id not in tokenizer.encode("<|end|>")


def test_tokenizer_training_is_deterministic(
    fact_base: tuple[list[Any], dict[str, list[str]]], tokenizer: TextTokenizer
) -> None:
    facts, templates = fact_base
    again = train_text_tokenizer(corpus_texts(facts, templates), 512)
    assert again.backend.to_str() == tokenizer.backend.to_str()


def test_labels_cover_only_the_answer_and_its_end_marker(tokenizer: TextTokenizer) -> None:
    history = (Turn("What is one plus one?", "One plus one is two."),)
    conversation = Conversation("f", "What is the capital of France?", "The capital of France is Paris.", history)
    example = encode_conversation(tokenizer, conversation)
    prompt = text_prompt_ids(tokenizer, conversation.question, history)
    answer = tokenizer.encode(conversation.answer)
    assert example.input_ids == prompt + answer + [tokenizer.eos_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_id]
    # the text prompt has the spoken prompt's layout, with the question typed in
    spoken = tokenizer.prompt_ids(history)
    patch = spoken.index(tokenizer.audio_patch_id)
    question = tokenizer.encode(conversation.question)
    assert prompt == spoken[:patch] + question + spoken[patch + 1 :]


def test_pad_batch_masks_padding(tokenizer: TextTokenizer) -> None:
    short = encode_conversation(tokenizer, Conversation("a", "Hi?", "Hello."))
    long = encode_conversation(tokenizer, Conversation("b", "What is the capital of France?", "Paris."))
    batch = pad_batch([short, long], tokenizer.pad_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert (batch["input_ids"][0, n:] == tokenizer.pad_id).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_batched_greedy_decoding_matches_one_at_a_time(tokenizer: TextTokenizer) -> None:
    torch.manual_seed(0)
    model = build_llm(LLMConfig(vocab_size=512, max_position_embeddings=256, **MICRO_LLM)).eval()
    prompts = [text_prompt_ids(tokenizer, q) for q in ["Hi?", "What is the capital of France?", "Tell me about mars."]]
    batched = lm.greedy_answers(model, tokenizer, prompts, max_new_tokens=6)
    alone = [lm.greedy_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert all(len(a) == 6 or tokenizer.eos_id not in a for a in batched)


def test_learning_rate_warms_up_then_decays_by_steps_or_time() -> None:
    assert warmup_cosine(0, 4, 0.0, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(4, 4, 0.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(50, 4, 0.5, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(99, 4, 1.0, 0.1) == pytest.approx(0.1)
    assert schedule_progress(10, 100, 5.0, 10 / 60) == pytest.approx(0.5)  # half the time, a tenth of the steps
    assert schedule_progress(10, 100, 5.0, 0) == pytest.approx(0.1)  # no time cap


def test_epoch_batches_cover_every_example_once() -> None:
    lengths = [5, 9, 3, 7, 7, 2, 8, 4, 6, 1]
    batches = lm.epoch_batches(lengths, 3, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches == lm.epoch_batches(lengths, 3, seed=1, epoch=0)
    assert batches != lm.epoch_batches(lengths, 3, seed=1, epoch=1)


def test_unknown_setting_is_an_error() -> None:
    with pytest.raises(Exception, match="unknown keys"):
        lm.LMSettings.from_mapping({"stepz": 3})


class StepCounter:
    """A reporter that counts trained steps and cancels the stage after `cancel_after` of them."""

    def __init__(self, ctx: StageContext | None = None, cancel_after: int = 0) -> None:
        self.ctx, self.cancel_after, self.trained, self.resumed_at = ctx, cancel_after, 0, 0

    def start(self, stage: str, total: int, unit: str = "steps") -> None:
        pass

    def advance(self, steps: int = 1, **metrics: float) -> None:
        if not metrics:  # the stage first reports the steps a checkpoint already holds
            self.resumed_at += steps
            return
        self.trained += steps
        if self.ctx is not None and self.cancel_after and self.trained >= self.cancel_after:
            self.ctx.cancel.set()

    def log(self, message: str) -> None:
        pass


def test_stage_writes_loadable_outputs_and_resumes(tmp_path: Path) -> None:
    ctx = StageContext(run_dir=tmp_path, stage="lm", settings=SMOKE_SETTINGS, facts=FACTS, seed=5)
    ctx.reporter = StepCounter(ctx, cancel_after=2)
    with pytest.raises(StageCancelled):
        run_stage(lm.run, ctx)
    state = json.loads((ctx.out / lm.CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 2
    assert not (ctx.out / DONE_FILE).exists()

    ctx.cancel.clear()
    counter = StepCounter()
    ctx.reporter = counter
    summary = run_stage(lm.run, ctx)
    assert (counter.resumed_at, counter.trained) == (2, 2)  # continued from the checkpoint, not from 0
    assert summary["steps_done"] == 4 and summary["facts"] == 6
    assert 0.0 <= summary["key_word_accuracy"] <= 1.0

    out = ctx.out
    tokenizer = TextTokenizer.load(out / lm.TOKENIZER_FILE, ChatFormat())
    config = read_part_config(out, "llm", LLMConfig)
    assert config.vocab_size % lm.VOCAB_MULTIPLE == 0 and config.vocab_size >= tokenizer.vocab_size
    assert config.hidden_size == MICRO_LLM["hidden_size"]
    model = load_part_weights(out, "llm", build_llm(config))
    assert isinstance(model, torch.nn.Module)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p[0] for p in metrics["curves"]["loss"]] == [1, 2, 3, 4]  # no step logged twice
    assert "key_word_accuracy" in metrics["evaluation"]
    assert (out / "loss.png").stat().st_size > 0
    assert (out / DONE_FILE).is_file()
