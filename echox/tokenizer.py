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
    """How a conversation becomes a prompt.

    `bos`, `eos` (the end-of-answer token), `audio_patch` and `pad` are single special tokens.
    The other markers are text in which special tokens are recognised, so a format whose role
    headers span several tokens (Llama-3's) is expressed exactly. A prompt is:
    bos, system, then per earlier turn user_prefix + text_prefix + user text + user_suffix +
    assistant_prefix + text_prefix + answer + assistant_suffix, then for the spoken turn
    user_prefix + audio_message + user_suffix + assistant_prefix.
    """

    bos: str = "<|bos|>"
    eos: str = "<|end|>"
    user_prefix: str = "<|user|>"
    user_suffix: str = "<|end|>"
    assistant_prefix: str = "<|assistant|>"
    assistant_suffix: str = "<|end|>"
    audio_patch: str = "<audio_patch>"
    audio_message: str = "<audio_patch>"  # the user's spoken message; holds one audio_patch
    text_prefix: str = ""  # before every text message body
    system: str = ""  # a whole system block, markers included; empty: none
    pad: str = "<|pad|>"
    period: str = "."

    def special_tokens(self) -> list[str]:
        """The tokens a tokenizer trained for this format must add as special tokens."""
        ordered = [self.pad, self.bos, self.eos, self.user_prefix, self.user_suffix, self.assistant_prefix]
        ordered += [self.assistant_suffix, self.audio_patch]
        return [t for t in dict.fromkeys(ordered) if t]


@dataclasses.dataclass(frozen=True)
class Turn:
    """One finished exchange of a conversation, as text."""

    user: str
    assistant: str


class TextTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows the chat format."""

    def __init__(self, tokenizer: Tokenizer, chat: ChatFormat) -> None:
        self.backend = tokenizer
        self.chat = chat
        singles = [chat.bos, chat.eos, chat.audio_patch, chat.pad]
        missing = [t for t in singles if tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"the tokenizer lacks the chat format's special tokens {missing}")
        tokenizer.encode_special_tokens = False  # markers are parsed with specials recognised
        self._markers = {name: self._marker_ids(getattr(chat, name)) for name in _MARKERS}
        if self._markers["audio_message"].count(self.special_id(chat.audio_patch)) != 1:
            raise ConfigError("the chat format's audio_message must hold exactly one audio_patch")
        # Text never turns into control tokens: a caller saying "<|end|>" cannot end a turn.
        # The prompt's markers are inserted by id in prompt_ids().
        self.backend.encode_special_tokens = True
        period_ids = tokenizer.encode(chat.period, add_special_tokens=False).ids
        if len(period_ids) != 1:
            raise ConfigError(f"the period {chat.period!r} must be one token, got {period_ids}")
        self.period_id = period_ids[0]
        self.audio_patch_id = self.special_id(chat.audio_patch)
        self.bos_id = self.special_id(chat.bos)
        self.eos_id = self.special_id(chat.eos)
        self.pad_id = self.special_id(chat.pad)

    def _marker_ids(self, text: str) -> list[int]:
        """A marker's ids, special tokens recognised (only at construction, before text mode)."""
        return list(self.backend.encode(text, add_special_tokens=False).ids) if text else []

    def marker_ids(self, name: str) -> list[int]:
        return list(self._markers[name])

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

    def prompt_ids(self, history: Sequence[Turn] = (), question: str | None = None) -> list[int]:
        """The prompt for a turn: earlier turns as text, then the user's message (one
        `<audio_patch>` for a spoken turn, or `question` as text), then the assistant header."""
        m = self._markers
        ids = [self.bos_id, *m["system"]]
        for turn in history:
            ids += [*m["user_prefix"], *m["text_prefix"], *self.encode(turn.user), *m["user_suffix"]]
            ids += [*m["assistant_prefix"], *m["text_prefix"], *self.encode(turn.assistant), *m["assistant_suffix"]]
        message = m["audio_message"] if question is None else [*m["text_prefix"], *self.encode(question)]
        return [*ids, *m["user_prefix"], *message, *m["user_suffix"], *m["assistant_prefix"]]

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @classmethod
    def load(cls, path: str | Path, chat: ChatFormat) -> TextTokenizer:
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise ModelLoadError(f"cannot read tokenizer {path}: {exc}") from None
        return cls(backend, chat)


_MARKERS = (
    "system", "user_prefix", "user_suffix", "assistant_prefix", "assistant_suffix", "audio_message", "text_prefix"
)


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
