"""Spoken questions for the listening stages (s2t, echo): clips, cached encoder states, batches.

    questions = load_spoken_questions(RUN / "synth", facts, split="train")
    plan = plan_renditions(questions, clean_per_text=6, augmented_per_text=2, seed=seed)
    states = encode_renditions(model, plan, AugmentSettings(), seed, cache_dir=RUN / "s2t" / "encoded")
    examples = build_examples(plan, states, tokenizer)      # one SpokenExample per rendition
    batch = collate(examples[:32])                          # what a training step consumes

The speech encoder is FROZEN in every listening stage, so its output states are computed once
per clip rendition (the clean clip, or one augmentation of it drawn from a generator seeded by
the clip id and the rendition number) and cached on disk in shards: a resumed stage, or a later
stage with the same encoder, reads them back instead of encoding again. A cache shard remembers
the encoder weights it was computed with; a different encoder never reads stale states.

The layout of a spoken turn is the one inference uses (`TextTokenizer.prompt_ids`: bos, earlier
text turns, user prefix, ONE `<audio_patch>`, user suffix, assistant prefix), followed here by
the answer tokens and the end marker, which are the only labelled positions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from echox.audio import FloatArray, read_wav
from echox.errors import EchoXError
from echox.models.echox import EchoXModel
from echox.tokenizer import TextTokenizer, Turn
from training.augment import AugmentSettings, augment
from training.distributed import Parallel
from training.jsonl import read_jsonl
from training.stages.synth import QUESTIONS_MANIFEST
from training.text_data import IGNORE_INDEX, Fact

CLEAN = 0  # rendition number of the unaugmented clip
SHARD_SIZE = 512  # renditions per cache file
CACHE_DTYPE = torch.float16  # halves the cache; the adapter reads the states back in its own dtype


@dataclasses.dataclass(frozen=True)
class SpokenQuestion:
    """One clip of synth's questions.jsonl with its fact's answer and key words."""

    id: str
    fact_id: str
    split: str
    voice: str
    text: str  # the transcript: what the voice says (the CTC target)
    path: Path  # absolute path of the 16 kHz WAV
    answer: str
    key: tuple[str, ...]
    category: str = ""  # the fact's category (capital, add, ...)


@dataclasses.dataclass(frozen=True)
class Rendition:
    """A clip as the encoder hears it: clean (`variant` 0) or its `variant`-th augmentation."""

    question: SpokenQuestion
    variant: int = CLEAN

    @property
    def key(self) -> str:
        return f"{self.question.id}#{self.variant}"


@dataclasses.dataclass(frozen=True)
class SpokenExample:
    """A training example of a spoken turn. `input_ids` hold one `<audio_patch>`; `labels` are
    IGNORE_INDEX on the prompt and the answer ids + end marker on the answer."""

    key: str
    fact_id: str
    states: torch.Tensor  # [T, d_enc] frozen encoder states of the rendition (CACHE_DTYPE)
    transcript_ids: tuple[int, ...]
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SpokenBatch:
    """Examples of one step. Speech stays per item (each utterance keeps its own length, as at
    inference); the token sequences are right-padded."""

    keys: list[str]
    states: list[torch.Tensor]  # [T_i, d_enc]
    transcripts: list[torch.Tensor]  # [n_i] CTC targets
    input_ids: list[torch.Tensor]  # [L_i] one <audio_patch> each
    labels: list[torch.Tensor]  # [L_i]


# --- clips ---------------------------------------------------------------------------------


def load_spoken_questions(
    synth_dir: Path, facts: Mapping[str, Fact], split: str | None = None
) -> list[SpokenQuestion]:
    """synth's question clips (one split, or all) joined with their facts."""
    path = synth_dir / QUESTIONS_MANIFEST
    questions = []
    for row in read_jsonl(path, "run the synth stage first"):
        if split is not None and row["split"] != split:
            continue
        fact = facts.get(row["fact_id"])
        if fact is None:
            raise EchoXError(f"{path}: clip {row['id']} names fact {row['fact_id']!r}, which the fact base lacks")
        questions.append(
            SpokenQuestion(
                row["id"], row["fact_id"], row["split"], row["voice"], row["text"], synth_dir / row["path"],
                fact.answer, fact.key, fact.category,
            )
        )
    return questions


def by_text(questions: Iterable[SpokenQuestion]) -> dict[str, list[SpokenQuestion]]:
    grouped: dict[str, list[SpokenQuestion]] = {}
    for question in questions:
        grouped.setdefault(question.text, []).append(question)
    return grouped


def spread_over_voices(clips: Sequence[SpokenQuestion], rng: random.Random) -> list[SpokenQuestion]:
    """The clips in a random order that visits every voice once before any voice twice."""
    shuffled = rng.sample(list(clips), len(clips))
    seen: dict[str, int] = {}
    rank = []
    for clip in shuffled:
        rank.append(seen.get(clip.voice, 0))
        seen[clip.voice] = rank[-1] + 1
    return [clip for _, _, clip in sorted(zip(rank, range(len(shuffled)), shuffled, strict=True))]


def plan_renditions(
    questions: Sequence[SpokenQuestion], clean_per_text: int, augmented_per_text: int, seed: int
) -> list[Rendition]:
    """For every question text: `clean_per_text` clean clips in as many voices as possible, then
    `augmented_per_text` augmented renditions of the clips that come next in that order (so
    augmentation mostly adds voices/rates the clean set lacks). Deterministic for a seed."""
    rng = random.Random(seed)
    plan: list[Rendition] = []
    grouped = by_text(questions)
    for text in sorted(grouped):
        ordered = spread_over_voices(grouped[text], rng)
        clean = ordered[:clean_per_text]
        plan += [Rendition(clip) for clip in clean]
        rest = ordered[len(clean) :] or ordered
        for i in range(augmented_per_text):
            clip = rest[i % len(rest)]
            plan.append(Rendition(clip, 1 + i // len(rest)))
    return plan


def sample_clips(questions: Sequence[SpokenQuestion], count: int, seed: int) -> list[SpokenQuestion]:
    """A deterministic sample of `count` clips (all of them when there are fewer), in id order."""
    chosen = random.Random(seed).sample(list(questions), min(count, len(questions)))
    return sorted(chosen, key=lambda q: q.id)


def rendition_audio(rendition: Rendition, settings: AugmentSettings, seed: int) -> FloatArray:
    """The 16 kHz samples the encoder hears: the clip, or its augmentation drawn from a generator
    seeded by (seed, clip id, variant), the same on every run and in any order."""
    audio = read_wav(rendition.question.path)
    if rendition.variant == CLEAN:
        return audio
    rng = np.random.default_rng([seed, zlib.crc32(rendition.question.id.encode()), rendition.variant])
    return augment(audio, rng, settings)


# --- cached encoder states -------------------------------------------------------------------


@torch.no_grad()  # not inference_mode: the states feed training graphs
def encode_audios(model: EchoXModel, audios: Sequence[FloatArray]) -> list[torch.Tensor]:
    """Frozen encoder states [T_i, d_enc] of each utterance, exactly as `encode_speech` computes
    them (log-mel padded to the window, trimmed to the states that cover the audio)."""
    encoder = model.speech_encoder
    features = torch.cat([encoder.log_mel(audio) for audio in audios]).to(model.device)
    lengths = [encoder.num_states(len(audio)) for audio in audios]
    states = model.encode_states(features, lengths)
    return [item[:n].clone() for item, n in zip(states, lengths, strict=True)]


def encoder_fingerprint(model: EchoXModel) -> str:
    """A short hash of the speech encoder's config and weights: names the cache it may read."""
    digest = hashlib.sha1(json.dumps(model.config.encoder.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.speech_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _shard_keys(plan: Sequence[Rendition]) -> list[list[str]]:
    keys = [r.key for r in plan]
    return [keys[i : i + SHARD_SIZE] for i in range(0, len(keys), SHARD_SIZE)]


def _shard_name(keys: Sequence[str], fingerprint: str, settings: AugmentSettings, seed: int) -> str:
    what = json.dumps([fingerprint, seed, dataclasses.asdict(settings), list(keys)])
    return f"states-{hashlib.sha1(what.encode()).hexdigest()[:16]}.safetensors"


def encode_renditions(
    model: EchoXModel,
    plan: Sequence[Rendition],
    settings: AugmentSettings,
    seed: int,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    part: tuple[int, int] = (0, 1),
) -> dict[str, torch.Tensor]:
    """Encoder states (CACHE_DTYPE, [T, d_enc]) of every rendition, by `Rendition.key`. Shards
    already in `cache_dir` (same encoder, augmentation, seed and keys) are read back; new
    shards are written as they are finished. `progress(n)` is told of every n renditions done
    (and may raise to stop: finished shards stay on disk). `part` = (k, n): only every n-th
    shard from the k-th, for n processes filling one cache."""
    fingerprint = encoder_fingerprint(model) if cache_dir is not None else ""
    out: dict[str, torch.Tensor] = {}
    by_key = {r.key: r for r in plan}
    was_training = model.training
    model.eval()
    for index, keys in enumerate(_shard_keys(plan)):
        if index % part[1] != part[0]:
            continue
        path = cache_dir / _shard_name(keys, fingerprint, settings, seed) if cache_dir is not None else None
        if path is not None and path.is_file():
            out.update(load_file(str(path)))
        else:
            shard: dict[str, torch.Tensor] = {}
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                audios = [rendition_audio(by_key[key], settings, seed) for key in chunk]
                states = encode_audios(model, audios)
                shard.update({key: s.to("cpu", CACHE_DTYPE).contiguous() for key, s in zip(chunk, states, strict=True)})
                if progress is not None:
                    progress(len(chunk))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(shard, str(path.with_suffix(".tmp")))
                path.with_suffix(".tmp").replace(path)
            out.update(shard)
            continue
        if progress is not None:
            progress(len(keys))
    model.train(was_training)
    return out


# --- examples and batches --------------------------------------------------------------------


def spoken_turn_ids(
    tokenizer: TextTokenizer, answer: str, history: Sequence[Turn] = ()
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a spoken turn: the inference prompt (one `<audio_patch>`), then the
    answer and the end marker; only those are labelled."""
    prompt = tokenizer.prompt_ids(history)
    answer_ids = [*tokenizer.encode(answer), tokenizer.eos_id]
    return prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids


def build_examples(
    plan: Sequence[Rendition],
    states: Mapping[str, torch.Tensor],
    tokenizer: TextTokenizer,
    histories: Mapping[str, Sequence[Turn]] | None = None,
) -> list[SpokenExample]:
    """One example per rendition; `histories` (by rendition key) puts earlier text turns first."""
    examples = []
    for rendition in plan:
        question = rendition.question
        history = (histories or {}).get(rendition.key, ())
        input_ids, labels = spoken_turn_ids(tokenizer, question.answer, history)
        examples.append(
            SpokenExample(
                rendition.key, question.fact_id, states[rendition.key], tuple(tokenizer.encode(question.text)),
                tuple(input_ids), tuple(labels),
            )
        )
    return examples


def collate(examples: Sequence[SpokenExample]) -> SpokenBatch:
    return SpokenBatch(
        keys=[e.key for e in examples],
        states=[e.states for e in examples],
        transcripts=[torch.tensor(e.transcript_ids, dtype=torch.long) for e in examples],
        input_ids=[torch.tensor(e.input_ids, dtype=torch.long) for e in examples],
        labels=[torch.tensor(e.labels, dtype=torch.long) for e in examples],
    )


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of one shuffled epoch in batches (the last one may be short), fixed by seed and epoch."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def batch_indices(count: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of training step `step`: a resumed run sees the batches of an unbroken one."""
    per_epoch = -(-count // batch_size)
    return epoch_batches(count, batch_size, seed, step // per_epoch)[step % per_epoch]


def encode_shared(
    parallel: Parallel,
    model: EchoXModel,
    plan: Sequence[Rendition],
    settings: AugmentSettings,
    seed: int,
    cache_dir: Path,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """`encode_renditions` with the work split over torchrun's ranks: each fills its share of
    the cache shards, then every rank reads them all."""
    if not parallel.active:
        return encode_renditions(model, plan, settings, seed, cache_dir, batch_size, progress)
    encode_renditions(model, plan, settings, seed, cache_dir, batch_size, progress,
                      part=(parallel.rank, parallel.world_size))
    parallel.barrier()
    return encode_renditions(model, plan, settings, seed, cache_dir, batch_size)
