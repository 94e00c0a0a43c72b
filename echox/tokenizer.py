"""Text tokenizer and chat prompt format.

A model folder carries a HF `tokenizers` JSON. Models trained here learn a BPE on their corpus;
a random-init model uses the byte-level tokenizer below (256 bytes + the special tokens), so
every text encodes without training anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from echox.config import ConfigBase
from echox.errors import ConfigError, ModelLoadError


@dataclasses.dataclass(frozen=True)
class ChatFormat(ConfigBase):
    """How a conversation becomes a prompt. Every marker is one special token of the tokenizer."""

    bos: str = "<|bos|>"
    user_prefix: str = "<|user|>"
    user_suffix: str = "<|end|>"
    assistant_prefix: str = "<|assistant|>"
    assistant_suffix: str = "<|end|>"
    audio_patch: str = "<audio_patch>"
    pad: str = "<|pad|>"
    period: str = "."

    def special_tokens(self) -> list[str]:
        ordered = [self.pad, self.bos, self.user_prefix, self.user_suffix, self.assistant_prefix]
        ordered += [self.assistant_suffix, self.audio_patch]
        return list(dict.fromkeys(ordered))


@dataclasses.dataclass(frozen=True)
class Turn:
    """One finished exchange of a conversation, as text."""

    user: str
    assistant: str


class TextTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows the chat format."""

    def __init__(self, tokenizer: Tokenizer, chat: ChatFormat) -> None:
        self.backend = tokenizer
        # Text never turns into control tokens: a caller saying "<|end|>" cannot end a turn.
        # The prompt's markers are inserted by id in prompt_ids().
        self.backend.encode_special_tokens = True
        self.chat = chat
        missing = [t for t in chat.special_tokens() if tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"the tokenizer lacks the chat format's special tokens {missing}")
        period_ids = tokenizer.encode(chat.period, add_special_tokens=False).ids
        if len(period_ids) != 1:
            raise ConfigError(f"the period {chat.period!r} must be one token, got {period_ids}")
        self.period_id = period_ids[0]
        self.audio_patch_id = self.special_id(chat.audio_patch)
        self.bos_id = self.special_id(chat.bos)
        self.eos_id = self.special_id(chat.assistant_suffix)
        self.pad_id = self.special_id(chat.pad)

    def special_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"unknown special token {token!r}")
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=True))

    def prompt_ids(self, history: Sequence[Turn] = ()) -> list[int]:
        """The prompt for a spoken turn: earlier turns as text, then one `<audio_patch>`."""
        c = self.chat
        ids = [self.bos_id]
        for turn in history:
            ids += [self.special_id(c.user_prefix), *self.encode(turn.user), self.special_id(c.user_suffix)]
            ids += [self.special_id(c.assistant_prefix), *self.encode(turn.assistant)]
            ids.append(self.special_id(c.assistant_suffix))
        ids += [self.special_id(c.user_prefix), self.audio_patch_id, self.special_id(c.user_suffix)]
        ids.append(self.special_id(c.assistant_prefix))
        return ids

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @classmethod
    def load(cls, path: str | Path, chat: ChatFormat) -> TextTokenizer:
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise ModelLoadError(f"cannot read tokenizer {path}: {exc}") from None
        return cls(backend, chat)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""  # an incomplete multi-byte character: wait for the next token
        delta, self._emitted = text[len(self._emitted) :], text
        return delta

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self._ids)


def byte_level_tokenizer(chat: ChatFormat | None = None) -> TextTokenizer:
    """A tokenizer with no learned merges: the 256 byte symbols plus the chat specials."""
    chat = chat or ChatFormat()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(chat.special_tokens())
    return TextTokenizer(backend, chat)
