"""Per-stage cost of one turn, measured in-process (`echox bench respond`).

Figures: speech encoder ms per second of audio, LLM ms per token (KV-cached decode step),
T2C ms per unit-language token, vocoder real-time factor, and the end-to-end timings of a
streamed turn. Each is the median over repetitions after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from echox.audio import FloatArray
from echox.checkpoint import EchoX
from echox.events import DoneEvent
from echox.streaming.responder import StreamingResponder


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def _decode_steps(model: Any, embed: torch.Tensor, steps: int) -> None:
    """`steps` KV-cached single-token steps of a decoder after a prompt."""
    out = model(inputs_embeds=embed, use_cache=True)
    step = embed[:, -1:]
    for _ in range(steps):
        out = model(inputs_embeds=step, cache=out.cache, use_cache=True)


def bench_stages(echox: EchoX, audio: FloatArray, repeats: int = 5, steps: int = 32) -> dict[str, float]:
    model = echox.model
    audio_seconds = len(audio) / 16_000
    encode = _median_seconds(lambda: model.encode_speech(audio), repeats)

    prompt = torch.randn(1, 40, model.config.llm.hidden_size)
    decoder = model.llm.get_decoder()
    llm_step = _median_seconds(lambda: _decode_steps(decoder, prompt, steps), repeats) / steps

    t2c = model.echo_decoder
    t2c_prompt = torch.randn(1, 12, model.config.echo_decoder.text_dim)

    def t2c_steps() -> None:
        with torch.inference_mode():
            _, cache = t2c(t2c_prompt, use_cache=True)
            step = t2c_prompt[:, -1:]
            for _ in range(steps):
                _, cache = t2c(step, cache=cache, use_cache=True)

    t2c_step = _median_seconds(t2c_steps, repeats) / steps

    generator = torch.Generator().manual_seed(0)
    units = torch.randint(0, model.config.vocoder.num_units, (100,), generator=generator)
    durations = torch.full_like(units, 2)  # 200 frames = 4 s at 50 Hz
    vocoded_seconds = float(durations.sum()) * model.config.vocoder.hop_length / 16_000
    vocode = _median_seconds(lambda: model.vocoder.synthesize(units, durations), repeats)
    return {
        "encoder_ms_per_audio_s": 1000 * encode / audio_seconds,
        "llm_ms_per_token": 1000 * llm_step,
        "t2c_ms_per_unit_token": 1000 * t2c_step,
        "vocoder_rtf": vocode / vocoded_seconds,
    }


def bench_turn(echox: EchoX, audio: FloatArray, repeats: int = 3) -> dict[str, float | None]:
    """End-to-end timings of a streamed turn (median of `repeats`)."""
    runs: list[DoneEvent] = []
    for _ in range(repeats + 1):
        events = list(StreamingResponder(echox).respond(audio))
        done = events[-1]
        assert isinstance(done, DoneEvent)
        runs.append(done)
    runs = runs[1:]  # the first turn is a warm-up

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    return {
        "first_text_ms": med([r.timings.first_text_ms for r in runs]),
        "first_audio_ms": med([r.timings.first_audio_ms for r in runs]),
        "total_ms": med([r.timings.total_ms for r in runs]),
        "answer_tokens": float(statistics.median([r.num_tokens for r in runs])),
    }


def silence_safe_audio(seconds: float = 3.0, seed: int = 0) -> FloatArray:
    """A deterministic speech-like test signal for when espeak-ng is not installed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (tone + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
