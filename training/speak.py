"""`echox speak "TEXT" --model DIR --out OUT.wav`: text → echo decoder → units → vocoder → speech.

The text is cut at sentence punctuation (the segmentation the t2c stage trains on) and each
sentence is laid out as inference lays out a segment, with the text embeddings of the LLM's
input table in place of hidden states: table[prefix] ; table[text ids] ; table[suffix].
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from echox.errors import EchoXError

if TYPE_CHECKING:  # the model stack (torch, transformers) loads only when a command runs
    from echox.checkpoint import EchoX


def segment_units(echox: EchoX, text: str) -> list[int]:
    """One segment's text → deduplicated speech units (greedy echo decoding)."""
    import torch

    model, tokenizer = echox.model, echox.tokenizer
    ids = [*model.t2c_prefix_ids(tokenizer.bos_id), *tokenizer.encode(text), *model.t2c_suffix_ids(tokenizer.eos_id)]
    with torch.inference_mode():
        table = model.input_table()
        inputs = table[torch.tensor(ids, device=model.device)]
        unit_tokens = model.echo_decoder.generate_units(inputs, table, stop_id=tokenizer.eos_id)
    return echox.codec.decode(unit_tokens)


def speak_text(echox: EchoX, text: str) -> npt.NDArray[np.float32]:
    """Speech for `text`, sentence by sentence: float32 at the vocoder's rate (16 kHz)."""
    from training.stages.t2c import split_sentences

    segments = split_sentences(text)
    if not segments:
        raise EchoXError("nothing to speak: the text is empty")
    vocoder = echox.model.vocoder
    pieces = [np.zeros(0, dtype=np.float32)]
    for segment in segments:
        units = segment_units(echox, segment)
        if units:
            pieces.append(vocoder.synthesize(units).float().cpu().numpy().astype(np.float32))
    return np.concatenate(pieces)


def register_cli(sub: Any) -> None:
    p = sub.add_parser("speak", help="say a text with a model's echo decoder and vocoder (no LLM)")
    p.add_argument("text", help="what to say; several sentences are spoken one after another")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    p.add_argument("--out", required=True, help="where to write the speech (16 kHz mono WAV)")
    p.set_defaults(handler=run_speak)


def run_speak(args: argparse.Namespace) -> int:
    from echox.audio import write_wav
    from echox.checkpoint import EchoX
    from echox.paths import resolve_model_dir

    if not args.text.strip():
        raise EchoXError("nothing to speak: the text is empty")
    echox = EchoX.from_pretrained(resolve_model_dir(args.model))
    audio = speak_text(echox, args.text)
    rate = echox.config.vocoder.sample_rate
    write_wav(args.out, audio, rate)
    print(f"wrote {args.out} ({audio.size / rate:.2f} s)")
    return 0
