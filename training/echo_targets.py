"""The echo stage's answers and targets: what the model itself answers a spoken question (decoded
as inference decodes), the hidden states that predicted each answer token, and the unit targets,
one per sentence segment of an answer.

`echo` targets: the frozen stage-II T2C (the echo decoder exactly as the t2c stage wrote it,
reading the LLM input table the t2c stage trained with) speaks each sentence of the answer the
model itself decoded, laid out as `training.speak.segment_units` lays out a segment:

    table[prefix] ; table[sentence ids] ; table[suffix]  → greedy unit-language tokens

The targets of an example are cached and reused while its decoded answer is unchanged, and the
T2C runs at most once per distinct sentence (`prefetch` speaks many sentences in one batched
pass: the gold answers, which a trained S2T model mostly decodes).

`gold` targets: the units of the recorded answer (units stage), unit-language encoded with the
model's codec; an answer of several sentences takes its sentences' own renderings from the t2c
stage's `pieces.jsonl` when all of them are there, else it stays one segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from echox.checkpoint import load_part_weights, read_part_config
from echox.models.echo_decoder import EchoDecoder, EchoDecoderConfig
from echox.models.echox import EchoXModel
from echox.tokenizer import TextTokenizer
from echox.units.codec import UnitLanguageCodec
from training.jsonl import read_jsonl, write_jsonl
from training.listen_data import SpokenExample
from training.stages.s2t import SpokenForward
from training.text_data import IGNORE_INDEX

SENTENCE_END = (".", "!", "?")  # the cuts of training.stages.t2c.split_sentences


@dataclasses.dataclass(frozen=True)
class SegmentTarget:
    """Answer tokens [start, end) and the unit-language tokens their segment is spoken as. The
    hidden states that PREDICTED those tokens feed the aligner."""

    start: int
    end: int
    unit_tokens: tuple[int, ...]


def sentence_spans(tokenizer: TextTokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Token spans of an answer's sentences: a cut after a token whose text ends a sentence
    (. ! ?) when whitespace follows, as `split_sentences` cuts the text. Spans without any
    text (trailing whitespace) join the span before them."""
    prefixes = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    spans: list[tuple[int, int]] = []
    start = 0
    for k in range(1, len(ids)):
        here, after = prefixes[k], prefixes[k + 1]
        follows = after[len(here) :] if after.startswith(here) else ""
        if here.endswith(SENTENCE_END) and follows[:1].isspace() and prefixes[k][len(prefixes[start]) :].strip():
            spans.append((start, k))
            start = k
    if start < len(ids):
        if spans and not tokenizer.decode(ids[start:]).strip():
            spans[-1] = (spans[-1][0], len(ids))
        else:
            spans.append((start, len(ids)))
    return spans


@dataclasses.dataclass
class FrozenT2C:
    """The stage-II echo decoder, frozen, with the input table it was trained on."""

    decoder: EchoDecoder
    table: torch.Tensor  # [V_text, H], the LLM input table of the lm stage
    tokenizer: TextTokenizer
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]

    @classmethod
    def load(cls, t2c_dir: Path, table: torch.Tensor, tokenizer: TextTokenizer, prefix: Sequence[int],
             suffix: Sequence[int]) -> FrozenT2C:
        decoder = EchoDecoder(read_part_config(t2c_dir, "echo_decoder", EchoDecoderConfig))
        load_part_weights(t2c_dir, "echo_decoder", decoder)
        decoder.eval().requires_grad_(False)
        return cls(decoder, table.detach(), tokenizer, tuple(prefix), tuple(suffix))

    def unit_tokens(self, text: str) -> tuple[int, ...]:
        """One segment's text → greedy unit-language tokens (segment_units without the decode)."""
        ids = [*self.prefix_ids, *self.tokenizer.encode(text), *self.suffix_ids]
        with torch.inference_mode():
            inputs = self.table[torch.tensor(ids, device=self.table.device)]
            tokens = self.decoder.generate_units(inputs, self.table, stop_id=self.tokenizer.eos_id)
        return tuple(tokens)

    @torch.inference_mode()
    def unit_tokens_batch(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """`unit_tokens` of several texts in one left-padded greedy pass (RoPE sees the same
        relative positions, so each row decodes as it would alone; same length limit and
        allowed ids as `EchoDecoder.generate_units`). Warms the cache far faster."""
        config, table, stop, device = self.decoder.config, self.table, self.tokenizer.eos_id, self.table.device
        rows = [[*self.prefix_ids, *self.tokenizer.encode(text), *self.suffix_ids] for text in texts]
        width = max(len(r) for r in rows)
        embeds = torch.stack([F.pad(table[torch.tensor(r, device=device)], (0, 0, width - len(r), 0)) for r in rows])
        mask = torch.stack([torch.arange(width, device=device) >= width - len(r) for r in rows]).long()
        limits = [self.decoder.unit_limit(len(r)) for r in rows]
        allowed = self.decoder.allowed_ids(stop, device)
        logits, cache = self.decoder(embeds, attention_mask=mask, use_cache=True)
        units: list[list[int]] = [[] for _ in rows]
        live = [limit > 0 for limit in limits]
        while any(live):
            chosen = (logits[:, -1].float() + allowed).argmax(-1).tolist()
            for row, token in enumerate(chosen):
                if live[row]:
                    live[row] = token != stop
                    if live[row]:
                        units[row].append(token - config.text_vocab_size)
                        live[row] = len(units[row]) < limits[row]
            if not any(live):
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            step = self.decoder.embed(torch.tensor(chosen, device=device)[:, None], table)
            logits, cache = self.decoder(step, attention_mask=mask, cache=cache, use_cache=True)
        return [tuple(u) for u in units]


class EchoTargetCache:
    """Echo targets per example, regenerated only when the example's decoded answer changes."""

    def __init__(self, t2c: FrozenT2C, spoken: dict[str, tuple[int, ...]] | None = None) -> None:
        self.t2c = t2c
        self.spoken = spoken if spoken is not None else {}  # text → unit tokens; caches may share it
        self._examples: dict[str, tuple[tuple[int, ...], list[SegmentTarget]]] = {}
        self.generated = 0  # sentences the T2C spoke
        self.reused = 0  # lookups answered from an example's unchanged answer
        self.refreshed = 0  # lookups whose answer was new or had changed

    def targets(self, example_id: str, answer_ids: Sequence[int]) -> list[SegmentTarget]:
        answer = tuple(answer_ids)
        cached = self._examples.get(example_id)
        if cached is not None and cached[0] == answer:
            self.reused += 1
            return cached[1]
        self.refreshed += 1
        tokenizer = self.t2c.tokenizer
        spans = sentence_spans(tokenizer, answer)
        targets = [SegmentTarget(s, e, self.sentence_units(tokenizer.decode(answer[s:e]).strip())) for s, e in spans]
        self._examples[example_id] = (answer, targets)
        return targets

    def prefetch(self, texts: Sequence[str], batch_size: int = 16) -> None:
        """Speaks the sentences of `texts` not spoken yet, in batches (e.g. the gold answers, which a
        trained S2T model mostly decodes)."""
        tokenizer = self.t2c.tokenizer
        sentences = dict.fromkeys(
            tokenizer.decode(ids[s:e]).strip()
            for ids in (tokenizer.encode(text) for text in texts)
            for s, e in sentence_spans(tokenizer, ids)
        )
        todo = sorted((s for s in sentences if s not in self.spoken), key=len)  # similar lengths: little padding
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            self.spoken.update(zip(chunk, self.t2c.unit_tokens_batch(chunk), strict=True))
            self.generated += len(chunk)

    def sentence_units(self, text: str) -> tuple[int, ...]:
        if text not in self.spoken:
            self.spoken[text] = self.t2c.unit_tokens(text)
            self.generated += 1
        return self.spoken[text]

    def save(self, path: Path) -> None:
        """The spoken sentences (text → unit tokens), so a resumed run does not speak them again."""
        write_jsonl(path, ({"text": t, "unit_tokens": list(u)} for t, u in sorted(self.spoken.items())))

    @staticmethod
    def read(path: Path) -> dict[str, tuple[int, ...]]:
        return {row["text"]: tuple(row["unit_tokens"]) for row in read_jsonl(path, missing_ok=True)}

    def figures(self) -> dict[str, int]:
        return {"targets_generated": self.generated, "targets_reused": self.reused,
                "targets_refreshed": self.refreshed}


def gold_targets(
    tokenizer: TextTokenizer,
    codec: UnitLanguageCodec,
    answer_ids: Sequence[int],
    answer_units: Sequence[int],
    pieces: Mapping[str, Sequence[int]],
) -> list[SegmentTarget]:
    """The recorded answer's units as targets: per sentence when every sentence has its own
    rendering in `pieces` (text → dedup units), else the whole answer as one segment."""
    spans = sentence_spans(tokenizer, answer_ids)
    texts = [tokenizer.decode(answer_ids[s:e]).strip() for s, e in spans]
    if len(spans) > 1 and all(text in pieces for text in texts):
        return [SegmentTarget(s, e, tuple(codec.encode(pieces[t]))) for (s, e), t in zip(spans, texts, strict=True)]
    return [SegmentTarget(0, len(answer_ids), tuple(codec.encode(answer_units)))] if answer_ids else []


def read_pieces(path: Path) -> dict[str, list[int]]:
    """The t2c stage's rendered segments (text → dedup units); empty when there are none."""
    return {row["text"]: list(row["units"]) for row in read_jsonl(path, missing_ok=True)}


# --- the model's own answers and their hidden states ----------------------------------------


def prompt_length(labels: Sequence[int] | torch.Tensor) -> int:
    """Positions before the answer: the first labelled position."""
    for position, label in enumerate(labels.tolist() if isinstance(labels, torch.Tensor) else labels):
        if label != IGNORE_INDEX:
            return position
    raise ValueError("no labelled position: not a spoken turn with an answer")


def answer_ids(example: SpokenExample) -> list[int]:
    """The answer an example teaches (its labelled ids without the end marker)."""
    return list(example.input_ids[prompt_length(example.labels) : -1])


def with_answer(example: SpokenExample, answer: Sequence[int], eos_id: int) -> SpokenExample:
    """The same spoken turn answered with `answer` (e.g. what the model decoded)."""
    prompt = list(example.input_ids[: prompt_length(example.labels)])
    ids = [*answer, eos_id]
    return dataclasses.replace(example, input_ids=(*prompt, *ids), labels=(*[IGNORE_INDEX] * len(prompt), *ids))


def spoken_prompts(model: EchoXModel, examples: Sequence[SpokenExample], patch_id: int) -> list[torch.Tensor]:
    """Each example's prompt embeddings [P, H] with its speech spliced in, as `SpeechLLMStage.run`
    builds them (adapter, CTC shrink and LookBack one utterance at a time)."""
    dtype = model.speech_adapter.projector.weight.dtype
    prompts = []
    for example in examples:
        adapted, logits = model.adapt(example.states.to(model.device, dtype).unsqueeze(0))
        _, shrunk = model.shrink(adapted, logits)
        ids = torch.tensor(example.input_ids[: prompt_length(example.labels)], device=model.device)
        prompts.append(model.splice(ids, patch_id, shrunk))
    return prompts


@torch.no_grad()
def greedy_decode(model: EchoXModel, prompts: Sequence[torch.Tensor], eos_id: int, max_tokens: int) -> list[list[int]]:
    """Greedy answers from prompt embeddings (left-padded, positions counted from each prompt's
    start, KV cache), each up to its end marker: the tokens `SpeechLLMStage.decode` emits."""
    llm = model.llm
    width = max(len(p) for p in prompts)
    embeds = torch.stack([F.pad(p, (0, 0, width - len(p), 0)) for p in prompts])
    mask = torch.stack([torch.arange(width, device=model.device) >= width - len(p) for p in prompts]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    answers: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    next_position = positions[:, -1:] + 1
    for _ in range(max_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        finished |= tokens == eos_id
        for row in torch.nonzero(~finished).flatten().tolist():
            answers[row].append(int(tokens[row]))
        if bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        step = llm.get_input_embeddings()(tokens[:, None])
        out = llm(inputs_embeds=step, attention_mask=mask, position_ids=next_position, cache=out.cache, use_cache=True)
        next_position = next_position + 1
    return answers


def decode_answers(model: EchoXModel, examples: Sequence[SpokenExample], patch_id: int, eos_id: int,
                   max_tokens: int) -> list[list[int]]:
    """What the model answers each spoken question, decoded as inference decodes (eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        answers = greedy_decode(model, spoken_prompts(model, examples, patch_id), eos_id, max_tokens)
    model.train(was_training)
    return answers


def predicting_states(forward: SpokenForward, row: int, start: int, end: int) -> torch.Tensor:
    """The hidden states that predicted answer tokens [start, end) of `row`: positions P−1+i."""
    first = prompt_length(forward.labels[row]) - 1
    return forward.hidden[row, first + start : first + end]
