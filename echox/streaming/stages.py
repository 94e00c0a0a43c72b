"""The three stages of a turn, as the distributed services run them one per process:

1. SpeechLLMStage: audio (+ history) → transcript, text tokens, and hidden-state segments
   cut by the streaming trigger while the LLM decodes.
2. UnitStage: a hidden-state segment → denoising adapter → echo decoder → unit-language
   tokens → deduplicated units.
3. VocoderStage: deduplicated units → 16 kHz PCM.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import torch

from echox.audio import FloatArray, prepare_audio
from echox.checkpoint import EchoX
from echox.events import TextDeltaEvent, TranscriptEvent
from echox.models.speech_adapter import ctc_greedy_ids
from echox.streaming.segmenter import CosinePeakSegmenter, Segment, cosine_scores
from echox.tokenizer import IncrementalDecoder, Turn


@dataclasses.dataclass(frozen=True)
class HiddenSegment:
    """The hidden states that predicted tokens [start, start + n) of the answer."""

    index: int
    start: int
    token_ids: tuple[int, ...]
    text: str
    hidden: torch.Tensor  # [n, H]


@dataclasses.dataclass(frozen=True)
class UnitSegment:
    index: int
    unit_tokens: tuple[int, ...]  # unit-language token ids
    units: tuple[int, ...]  # deduplicated speech units


@dataclasses.dataclass(frozen=True)
class AudioSegment:
    index: int
    pcm: npt.NDArray[np.float32]


@dataclasses.dataclass(frozen=True)
class AnswerEnd:
    """The LLM finished (or was cancelled); `token_ids` is the whole answer."""

    token_ids: tuple[int, ...]
    text: str
    cancelled: bool


SpeechLLMOutput = TranscriptEvent | TextDeltaEvent | HiddenSegment | AnswerEnd


class SpeechLLMStage:
    """Speech encoder + adapter + LLM with a KV cache, and the cosine-peak trigger."""

    def __init__(self, echox: EchoX) -> None:
        self.echox = echox
        self.model = echox.model
        self.tokenizer = echox.tokenizer

    @property
    def max_audio_seconds(self) -> float:
        return self.model.config.encoder.window_seconds

    def prepare(self, samples: npt.ArrayLike, sample_rate: int) -> FloatArray:
        return prepare_audio(samples, sample_rate, max_seconds=self.max_audio_seconds)

    @torch.inference_mode()
    def run(
        self, audio: FloatArray, history: Sequence[Turn] = (), cancel: threading.Event | None = None
    ) -> Iterator[SpeechLLMOutput]:
        """Yields the transcript, then text deltas and segments as they happen, then AnswerEnd."""
        encoding = self.model.encode_speech(audio)
        blank = self.tokenizer.audio_patch_id
        yield TranscriptEvent(self.tokenizer.decode(ctc_greedy_ids(encoding.ctc_logits, blank)))
        prompt = torch.tensor(self.tokenizer.prompt_ids(history), device=self.model.device)
        embeds = self.model.splice(prompt, blank, [encoding.shrunk])
        yield from self.decode(embeds, cancel)

    @torch.inference_mode()
    def decode(self, prompt_embeds: torch.Tensor, cancel: threading.Event | None = None) -> Iterator[
        TextDeltaEvent | HiddenSegment | AnswerEnd
    ]:
        """Greedy decoding from prompt embeddings [L, H]; token i is paired with the hidden
        state that predicted it, and that pair feeds the trigger and the segment."""
        llm = self.model.llm
        decoder, head = llm.get_decoder(), llm.get_output_embeddings()
        period_row = head.weight[self.tokenizer.period_id]
        segmenter = CosinePeakSegmenter(self.model.config.segmenter)
        text = IncrementalDecoder(self.tokenizer)
        tokens: list[int] = []
        hiddens: list[torch.Tensor] = []
        out = decoder(inputs_embeds=prompt_embeds.unsqueeze(0), use_cache=True)
        for index in range(self.model.config.max_answer_tokens):
            if cancel is not None and cancel.is_set():
                yield AnswerEnd(tuple(tokens), text.text, cancelled=True)
                return
            hidden = out.last_hidden_state[0, -1]
            token = int(head(hidden).argmax())
            if token == self.tokenizer.eos_id:
                break
            tokens.append(token)
            hiddens.append(hidden)
            yield TextDeltaEvent(index, token, text.push(token))
            cut = segmenter.push(float(cosine_scores(hidden.unsqueeze(0), period_row)[0]))
            if cut is not None:
                yield self._segment(cut, tokens, hiddens)
            step = llm.get_input_embeddings()(torch.tensor([[token]], device=prompt_embeds.device))
            out = decoder(inputs_embeds=step, cache=out.cache, use_cache=True)
        last = segmenter.finish()
        if last is not None:
            yield self._segment(last, tokens, hiddens)
        yield AnswerEnd(tuple(tokens), text.text, cancelled=False)

    def _segment(self, cut: Segment, tokens: list[int], hiddens: list[torch.Tensor]) -> HiddenSegment:
        ids = tuple(tokens[cut.start : cut.end])
        hidden = torch.stack(hiddens[cut.start : cut.end])
        return HiddenSegment(cut.index, cut.start, ids, self.tokenizer.decode(ids), hidden)


class UnitStage:
    """Denoising adapter + echo decoder: hidden states → unit-language tokens → units."""

    def __init__(self, echox: EchoX) -> None:
        self.model = echox.model
        self.tokenizer = echox.tokenizer
        self.codec = echox.codec

    @torch.inference_mode()
    def generate(self, segment: HiddenSegment) -> UnitSegment:
        model, tok = self.model, self.tokenizer
        table = model.input_table()
        prefix = torch.tensor(model.t2c_prefix_ids(tok.bos_id), device=model.device)
        separator = torch.tensor(model.t2c_suffix_ids(tok.eos_id), device=model.device)
        hidden = segment.hidden.to(device=model.device, dtype=table.dtype)
        inputs = torch.cat([table[prefix], model.aligner(hidden), table[separator]])
        unit_tokens = model.echo_decoder.generate_units(inputs, table, stop_id=tok.eos_id)
        units = self.codec.decode(unit_tokens)
        return UnitSegment(segment.index, tuple(unit_tokens), tuple(units))


class VocoderStage:
    """Unit vocoder: deduplicated units → 16 kHz float PCM."""

    def __init__(self, echox: EchoX) -> None:
        self.vocoder = echox.model.vocoder

    @torch.inference_mode()
    def synthesize(self, segment: UnitSegment) -> AudioSegment:
        if not segment.units:
            return AudioSegment(segment.index, np.zeros(0, dtype=np.float32))
        device = next(self.vocoder.parameters()).device
        pcm = self.vocoder.synthesize(torch.tensor(segment.units, device=device))
        return AudioSegment(segment.index, pcm.float().cpu().numpy().astype(np.float32))
