"""The text corpus of the LLM stage: every fact's questions with its answer, in the chat format.

The fact base (facts.jsonl + templates.json) is the LLM's whole world: each fact's question
phrasings (every template of its category, filled with its slots) are paired with its answer.
Prompts follow `TextTokenizer.prompt_ids` with the question as TEXT in the user turn instead of
`<audio_patch>`, so the model learns the same conversation layout it later answers speech in.
Some examples carry an earlier question and answer as history, so the model also learns to read
past a finished turn.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from echox.errors import ConfigError
from echox.tokenizer import ChatFormat, TextTokenizer, Turn
from training.jsonl import read_jsonl

IGNORE_INDEX = -100  # labels with this value add nothing to the cross-entropy


@dataclasses.dataclass(frozen=True)
class Fact:
    """One line of facts.jsonl."""

    id: str
    category: str
    slots: dict[str, str]
    answer: str
    key: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One training conversation: optional finished turns, then the question to answer."""

    fact_id: str
    question: str
    answer: str
    history: tuple[Turn, ...] = ()


@dataclasses.dataclass(frozen=True)
class ChatExample:
    """A tokenized conversation: labels are the input ids on the answer (and its end marker)
    and IGNORE_INDEX on every prompt token, history included."""

    fact_id: str
    input_ids: list[int]
    labels: list[int]


def load_facts(folder: Path) -> list[Fact]:
    path = folder / "facts.jsonl"
    if not path.is_file():
        raise ConfigError(f"no fact base at {folder}: facts.jsonl is missing")
    return [
        Fact(row["id"], row["category"], dict(row["slots"]), row["answer"], tuple(row["key"]))
        for row in read_jsonl(path)
    ]


def load_templates(folder: Path) -> dict[str, list[str]]:
    path = folder / "templates.json"
    if not path.is_file():
        raise ConfigError(f"no fact base at {folder}: templates.json is missing")
    return {category: list(phrasings) for category, phrasings in json.loads(path.read_text()).items()}


def questions_for(fact: Fact, templates: dict[str, list[str]]) -> list[str]:
    """Every phrasing of the fact's question, in the order of templates.json."""
    if fact.category not in templates:
        raise ConfigError(f"fact {fact.id}: no templates for category {fact.category!r}")
    return [template.format(**fact.slots) for template in templates[fact.category]]


def corpus_texts(facts: Sequence[Fact], templates: dict[str, list[str]]) -> list[str]:
    """The plain text the tokenizer learns from: every question and every answer."""
    texts: list[str] = []
    for fact in facts:
        texts += questions_for(fact, templates)
        texts.append(fact.answer)
    return texts


def build_conversations(
    facts: Sequence[Fact], templates: dict[str, list[str]], history_share: float = 0.5, seed: int = 0
) -> list[Conversation]:
    """Every question of every fact alone; a `history_share` of them (chosen at random, fixed
    by the seed) also comes again after another fact's question and answer. Half of those
    earlier turns are from the same category ("capital of Germany?" then "of France?"), the
    case where a model most easily repeats the earlier answer."""
    rng = random.Random(seed)
    conversations: list[Conversation] = []
    for fact in facts:
        others = [f for f in facts if f.id != fact.id]
        similar = [f for f in others if f.category == fact.category] or others
        for question in questions_for(fact, templates):
            conversations.append(Conversation(fact.id, question, fact.answer))
            if others and rng.random() < history_share:
                other = rng.choice(similar if rng.random() < 0.5 else others)
                earlier = Turn(rng.choice(questions_for(other, templates)), other.answer)
                conversations.append(Conversation(fact.id, question, fact.answer, (earlier,)))
    return conversations


def text_prompt_ids(tokenizer: TextTokenizer, question: str, history: Sequence[Turn] = ()) -> list[int]:
    """Like `TextTokenizer.prompt_ids`, with the question typed instead of spoken: bos, the
    earlier turns, user prefix, question tokens, user suffix, assistant prefix."""
    chat = tokenizer.chat
    user_prefix, user_suffix = tokenizer.special_id(chat.user_prefix), tokenizer.special_id(chat.user_suffix)
    assistant_prefix = tokenizer.special_id(chat.assistant_prefix)
    ids = [tokenizer.bos_id]
    for turn in history:
        ids += [user_prefix, *tokenizer.encode(turn.user), user_suffix]
        ids += [assistant_prefix, *tokenizer.encode(turn.assistant), tokenizer.eos_id]
    ids += [user_prefix, *tokenizer.encode(question), user_suffix, assistant_prefix]
    return ids


def encode_conversation(tokenizer: TextTokenizer, conversation: Conversation) -> ChatExample:
    prompt = text_prompt_ids(tokenizer, conversation.question, conversation.history)
    answer = [*tokenizer.encode(conversation.answer), tokenizer.eos_id]
    return ChatExample(conversation.fact_id, prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def pad_batch(examples: Sequence[ChatExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` (1 on real tokens) and `labels` (-100 on pads)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_text_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, chat: ChatFormat | None = None, min_frequency: int = 2
) -> TextTokenizer:
    """A byte-level BPE learned on `texts`: any text encodes (the 256 byte symbols are always
    in the vocabulary), the chat markers are special tokens (ids 0..), and "." stays one token
    because the byte-level pre-tokenizer splits punctuation from words."""
    chat = chat or ChatFormat()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=chat.special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return TextTokenizer(backend, chat)
