"""Import a released EchoX-3B/8B checkpoint (FreedomIntelligence/EchoX) into our model folder.

Expected source layout (SRC is the folder given to `echox model import-official SRC`):

    SRC/config.json               the EchoXForCausalLM config: a Llama config plus adapter_size,
                                  unit_vocab_size, unit_model, unit_output, audio_tower, ...
    SRC/model.safetensors         every weight; or shards listed in model.safetensors.index.json;
                                  or shards named model-00001-of-0000N.safetensors
    SRC/tokenizer.json            the Llama-3 tokenizer: <audio_patch> below the LLM vocab V, the
                                  unit-language tokens <|unit_...|> at ids V .. V+U-1
    SRC/tokenizer_config.json     optional: its pad and eos tokens
    SRC/g_00500000                the fairseq CodeHiFiGAN checkpoint, {"generator": state dict}
    SRC/vocoder_config.json       its fairseq config (both may also sit in SRC/vocoder/)
    SRC/whisper/                  the HF Whisper-large-v3 folder (config.json + safetensors); also
                                  SRC/whisper-large-v3/, or config.json's audio_tower taken
                                  relative to SRC or to its parent (the release's repo layout)

The release has no separate unit-language file: it decodes the T2C's output with the text
tokenizer, where unit token k is the added token at id V + k, `<|unit_12|>` or a sentencepiece
piece such as `<|unit_▁12▁7|>`; the digits are the units, and units the vocoder lacks are
dropped. Those tokens become our unit-language codec; the text tokenizer is kept without them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from echox.checkpoint import EchoX
from echox.convert.files import Tensors, listing, load_safetensors, read_json, safetensors_files
from echox.errors import EchoXError, ModelLoadError
from echox.models.echo_decoder import EchoDecoderConfig
from echox.models.echox import OFFICIAL_T2C_PREFIX, OFFICIAL_T2C_SUFFIX, EchoXConfig, EchoXModel
from echox.models.llm import LLMConfig
from echox.models.speech_adapter import SpeechAdapterConfig
from echox.models.speech_encoder import SpeechEncoderConfig
from echox.models.vocoder import VocoderConfig, load_fairseq_state_dict
from echox.streaming.segmenter import SegmenterConfig
from echox.tokenizer import ChatFormat, TextTokenizer
from echox.units.codec import UnitLanguageCodec, unit_symbols

log = logging.getLogger(__name__)


VOCODER_CHECKPOINT = "g_00500000"
VOCODER_CONFIG = "vocoder_config.json"
WHISPER_FOLDERS = ("whisper", "whisper-large-v3")
OFFICIAL_T2C_MAX_POSITIONS = 2048  # hard-coded in the released T2C
OFFICIAL_MAX_ANSWER_TOKENS = 512  # the released streaming default
# The system prompt the released models were trained with (part of their expected input).
OFFICIAL_SYSTEM_MESSAGE = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
# Every text id the released T2C reads from its own table at inference: the prompt before a
# segment, the prompt after it (eot + the "speaker" header), the stop id.
OFFICIAL_T2C_TEXT_IDS = (*OFFICIAL_T2C_PREFIX, *OFFICIAL_T2C_SUFFIX)

# Source prefix → our prefix. Order matters: the specific `model.*` modules come first.
PREFIX_RENAMES = (
    ("model.mm_projector1.", "speech_adapter.projector."),
    ("model.asr_transformer_encoder.layers.0.", "speech_adapter.layer."),
    ("model.out_norm.", "speech_adapter.norm."),
    ("model.audio_feature_head.", "ctc_head."),
    ("model.lbm.encoder_attn.", "lookback.attn."),
    ("model.lbm.atten_layer_norm.", "lookback.norm."),
    ("model.embed_tokens.", "llm.model.embed_tokens."),
    ("model.layers.", "llm.model.layers."),
    ("model.norm.", "llm.model.norm."),
    ("lm_head.", "llm.lm_head."),
    ("unit_translator.model.layers.", "echo_decoder.decoder.layers."),
    ("unit_translator.model.norm.", "echo_decoder.decoder.norm."),
    ("unit_translator.unit_embedding.", "echo_decoder.unit_embed."),
    ("unit_translator.adapter.", "echo_decoder.adapter."),
    ("unit_translator.lm_head.", "echo_decoder.lm_head."),
    ("unit_translator.aligner_MLP.", "aligner.net."),
)
LLM_TABLE = "model.embed_tokens.weight"
LLM_HEAD = "lm_head.weight"
T2C_TABLE = "unit_translator.model.embed_tokens.weight"
_WHISPER_PREFIXES = ("model.encoder.", "encoder.", "")
_WHISPER_UNUSED = ("model.decoder.", "decoder.", "proj_out.")  # Whisper's text decoder
_RECOMPUTED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # old transformers saved RoPE tables
_UNIT_TOKEN = re.compile(r"^<\|unit_(.*)\|>$")
_SP_SPACE = "▁"


@dataclasses.dataclass(frozen=True)
class OfficialSource:
    """Where each part of a released checkpoint lives."""

    config: Path
    weights: tuple[Path, ...]
    tokenizer: Path
    tokenizer_config: Path | None
    whisper: Path
    vocoder: Path
    vocoder_config: Path


def import_official(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Converts a released EchoX folder (layout above) into our model folder; returns its path."""
    src, out = Path(src_dir), Path(out_dir)
    source = locate(src)
    if out.resolve() == src.resolve():
        raise ModelLoadError("the output folder must differ from the source folder")
    cfg = read_json(source.config)
    tensors = load_safetensors(source.weights)
    whisper_cfg = read_json(source.whisper / "config.json")
    whisper = whisper_encoder_tensors(load_safetensors(safetensors_files(source.whisper, "Whisper")))
    vocoder_config = _vocoder_config(source.vocoder_config)
    config = build_config(cfg, whisper_cfg, tensors, vocoder_config)
    tokenizer, unit_texts = split_tokenizer(
        source.tokenizer, config.llm.vocab_size, config.echo_decoder.unit_vocab_size
    )
    tok_cfg = read_json(source.tokenizer_config) if source.tokenizer_config else {}
    config = config.replace(chat=official_chat_format(tokenizer, tok_cfg))
    with torch.device("meta"):
        model = EchoXModel(config)
    state, unused = map_state_dict(tensors, model.state_dict().keys(), config.llm.tie_word_embeddings)
    state.update({f"speech_encoder.whisper.{k}": v for k, v in whisper.items()})
    vocoder = load_fairseq_state_dict(_read_generator(source.vocoder), vocoder_config)
    state.update({f"vocoder.{k}": v for k, v in vocoder.items()})
    model = assemble(model, state, unused)
    codec = unit_language(unit_texts, config.vocoder.num_units)
    try:
        bundle = EchoX(model, TextTokenizer(tokenizer, config.chat), codec)
    except EchoXError as exc:
        raise ModelLoadError(f"{src}: {exc}") from None
    return bundle.save_pretrained(out)


# --- finding and reading the files ----------------------------------------------------------
def locate(src: Path) -> OfficialSource:
    """Finds every file of the layout, with one error naming all that are missing."""
    if not src.is_dir():
        raise ModelLoadError(f"no released EchoX folder at {src}")
    missing: list[str] = []

    def first(candidates: Iterable[Path], what: str) -> Path:
        for path in candidates:
            if path.exists():
                return path
        missing.append(what)
        return src / "<missing>"

    config = first([src / "config.json"], "config.json")
    tokenizer = first([src / "tokenizer.json"], "tokenizer.json")
    vocoder = first([src / VOCODER_CHECKPOINT, src / "vocoder" / VOCODER_CHECKPOINT], VOCODER_CHECKPOINT)
    vocoder_cfg = first([src / VOCODER_CONFIG, src / "vocoder" / VOCODER_CONFIG], VOCODER_CONFIG)
    whisper_dirs = [src / name for name in WHISPER_FOLDERS]
    tower = read_json(config).get("audio_tower") if config.is_file() else None
    if isinstance(tower, str) and tower:  # relative to SRC, or to the release repo beside it
        whisper_dirs += [src / tower, src.parent / tower]
    whisper = first((d for d in whisper_dirs if (d / "config.json").is_file()), "whisper/ (HF Whisper folder)")
    if missing:
        raise ModelLoadError(f"{src} is not a released EchoX folder: missing {', '.join(missing)}")
    tok_cfg = src / "tokenizer_config.json"
    return OfficialSource(
        config=config,
        weights=safetensors_files(src, "EchoX"),
        tokenizer=tokenizer,
        tokenizer_config=tok_cfg if tok_cfg.is_file() else None,
        whisper=whisper,
        vocoder=vocoder,
        vocoder_config=vocoder_cfg,
    )


def whisper_encoder_tensors(tensors: Tensors) -> Tensors:
    """Whisper encoder tensors keyed as HF's WhisperEncoder; the text decoder is dropped."""
    prefix = next((p for p in _WHISPER_PREFIXES if f"{p}conv1.weight" in tensors), None)
    if prefix is None:
        raise ModelLoadError("the Whisper weights have no encoder (no conv1.weight)")
    encoder, unknown = {}, []
    for key, tensor in tensors.items():
        if key.startswith(prefix) and not key.startswith(_WHISPER_UNUSED):
            encoder[key[len(prefix) :]] = tensor
        elif not key.startswith(_WHISPER_UNUSED):
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"unknown keys in the Whisper weights: {listing(unknown)}")
    return encoder


def _vocoder_config(path: Path) -> VocoderConfig:
    try:
        return VocoderConfig.from_fairseq_json(read_json(path))
    except EchoXError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def _read_generator(path: Path) -> Tensors:
    """The generator state dict of a fairseq `g_*` checkpoint (tensors only: no code runs)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign pickle
        raise ModelLoadError(f"cannot read the vocoder checkpoint {path}: {exc}") from None
    state = checkpoint.get("generator") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} has no 'generator' state dict")
    return state


# --- sizes -----------------------------------------------------------------------------------
def build_config(
    cfg: Mapping[str, Any], whisper_cfg: Mapping[str, Any], tensors: Tensors, vocoder: VocoderConfig
) -> EchoXConfig:
    """Every size from the source configs and shapes, with the release's quirks switched on."""
    try:
        encoder = encoder_config_from_whisper(whisper_cfg)
        llm = llm_config_from_official(cfg, tensors)
        return EchoXConfig(
            encoder=encoder,
            adapter=adapter_config_from_official(cfg, tensors, llm, encoder),
            llm=llm,
            echo_decoder=t2c_config_from_official(cfg, tensors, llm),
            vocoder=vocoder,
            segmenter=SegmenterConfig(),  # the release's trigger: lag 5, 50 / 20 tokens, 0.1
            official_compat=True,
            max_answer_tokens=OFFICIAL_MAX_ANSWER_TOKENS,
        )
    except (EchoXError, KeyError, TypeError, ValueError) as exc:
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelLoadError(f"cannot read the released config: {reason}") from None


def encoder_config_from_whisper(cfg: Mapping[str, Any]) -> SpeechEncoderConfig:
    if cfg.get("activation_function", "gelu") != "gelu":
        raise ModelLoadError(f"unsupported Whisper activation {cfg['activation_function']!r}")
    return SpeechEncoderConfig(
        d_model=int(cfg["d_model"]),
        num_layers=int(cfg["encoder_layers"]),
        num_heads=int(cfg["encoder_attention_heads"]),
        ffn_dim=int(cfg["encoder_ffn_dim"]),
        num_mel_bins=int(cfg["num_mel_bins"]),
        max_source_positions=int(cfg["max_source_positions"]),
        trim_to_audio=False,  # the release encodes the whole padded 30 s window
    )


def rope_parameters(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """transformers-5 `rope_parameters` from a config written by either major version."""
    if isinstance(cfg.get("rope_parameters"), dict):
        return dict(cfg["rope_parameters"])
    scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {"rope_type": rope_type, "rope_theta": float(cfg.get("rope_theta", 10000.0)), **scaling}


def llm_config_from_official(cfg: Mapping[str, Any], tensors: Tensors) -> LLMConfig:
    """The Llama sizes from config.json; tying is read from the tensors themselves."""
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim")
    rope = rope_parameters(cfg)
    extra: dict[str, Any] = {} if rope["rope_type"] == "default" else {"rope_parameters": rope}
    for name, default in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if cfg.get(name, default) != default:
            extra[name] = cfg[name]
    return LLMConfig(
        model_type="llama",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=None if head_dim in (None, hidden // heads) else int(head_dim),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        rope_theta=float(rope["rope_theta"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=_llm_is_tied(cfg, tensors),
        extra=extra,
    )


def _llm_is_tied(cfg: Mapping[str, Any], tensors: Tensors) -> bool:
    if LLM_HEAD not in tensors:
        return True
    if LLM_TABLE in tensors and torch.equal(tensors[LLM_HEAD], tensors[LLM_TABLE]):
        return True
    if cfg.get("tie_word_embeddings"):
        raise ModelLoadError("config.json ties the LLM head to its embeddings, but lm_head.weight differs")
    return False


def adapter_config_from_official(
    cfg: Mapping[str, Any], tensors: Tensors, llm: LLMConfig, encoder: SpeechEncoderConfig
) -> SpeechAdapterConfig:
    adapter_size = int(cfg["adapter_size"])
    if adapter_size != encoder.d_model:
        raise ModelLoadError(f"adapter_size {adapter_size} != the Whisper width {encoder.d_model}")
    linear1 = _tensor(tensors, "model.asr_transformer_encoder.layers.0.linear1.weight")
    return SpeechAdapterConfig(
        encoder_dim=adapter_size,
        hidden_size=llm.hidden_size,
        num_heads=llm.num_heads,  # the release uses the LLM's head count for both attentions
        stack=2,
        ff_mult=linear1.shape[0] // llm.hidden_size,
        dropout=0.1,
        lookback_heads=llm.num_heads,
        lookback_mask_dropped=True,
        official_batch_first_quirk=True,
    )


def t2c_heads(unit_model: str | None, llm: LLMConfig) -> int:
    """Head count of the released T2C sizes: large 2×H (the LLM's heads), small 4×512 (8),
    default (no unit_model) 6×512 (8), anything else medium 8×768 (12)."""
    if unit_model == "large":
        return llm.num_heads
    return 12 if unit_model not in (None, "small") else 8


def t2c_config_from_official(cfg: Mapping[str, Any], tensors: Tensors, llm: LLMConfig) -> EchoDecoderConfig:
    """T2C sizes from the shapes; the head count (not in any shape) from `unit_model`."""
    units = _tensor(tensors, "unit_translator.unit_embedding.weight").shape[0]
    if cfg.get("unit_vocab_size") not in (None, units):
        raise ModelLoadError(f"unit_vocab_size {cfg['unit_vocab_size']} != {units} unit embeddings")
    hidden = _tensor(tensors, "unit_translator.adapter.weight").shape[0]
    heads = t2c_heads(cfg.get("unit_model"), llm)
    q_rows = _tensor(tensors, "unit_translator.model.layers.0.self_attn.q_proj.weight").shape[0]
    k_rows = _tensor(tensors, "unit_translator.model.layers.0.self_attn.k_proj.weight").shape[0]
    if hidden % heads or q_rows != hidden or k_rows % (hidden // heads):
        raise ModelLoadError(f"T2C attention shapes ({q_rows}, {k_rows}) do not fit {heads} heads of {hidden}")
    layers = {int(k.split(".")[3]) for k in tensors if k.startswith("unit_translator.model.layers.")}
    rope = rope_parameters(cfg)  # the released T2C inherits the LLM's RoPE (llama3 scaling)
    return EchoDecoderConfig(
        text_vocab_size=llm.vocab_size,
        text_dim=llm.hidden_size,
        unit_vocab_size=units,
        hidden_size=hidden,
        num_layers=max(layers) + 1,
        num_heads=heads,
        num_kv_heads=k_rows // (hidden // heads),
        intermediate_size=_tensor(tensors, "unit_translator.model.layers.0.mlp.gate_proj.weight").shape[0],
        max_position_embeddings=OFFICIAL_T2C_MAX_POSITIONS,
        rope_theta=float(rope["rope_theta"]),
        rope_parameters=None if rope["rope_type"] == "default" else rope,
        rms_norm_eps=llm.rms_norm_eps,
        aligner_intermediate_size=_tensor(tensors, "unit_translator.aligner_MLP.0.weight").shape[0],
        aligner_dropout=0.1,
    )


def _tensor(tensors: Tensors, key: str) -> torch.Tensor:
    if key not in tensors:
        raise ModelLoadError(f"the checkpoint lacks {key}")
    return tensors[key]


# --- weights ---------------------------------------------------------------------------------
def rename(key: str) -> str | None:
    """Our key for a source key of the EchoX checkpoint, None when no rule applies."""
    for old, new in PREFIX_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def map_state_dict(tensors: Tensors, expected: Collection[str], tied: bool) -> tuple[Tensors, list[str]]:
    """Our keys for the EchoX checkpoint's tensors (the tensors themselves, not copies), and the
    source keys that land nowhere."""
    out: Tensors = {}
    unused: list[str] = []
    for key, tensor in tensors.items():
        ours = rename(key)
        if ours is not None and ours in expected:
            out[ours] = tensor
        elif key != T2C_TABLE and not _RECOMPUTED.search(key):  # shared below / recomputed
            unused.append(key)
    if tied and "llm.model.embed_tokens.weight" in out:
        out["llm.lm_head.weight"] = out["llm.model.embed_tokens.weight"]  # one tensor, stored once
    if T2C_TABLE in tensors and LLM_TABLE in tensors:
        check_t2c_table(tensors[T2C_TABLE], tensors[LLM_TABLE])
    return out, unused


def check_t2c_table(
    t2c_table: torch.Tensor, llm_table: torch.Tensor, read_ids: Sequence[int] = OFFICIAL_T2C_TEXT_IDS
) -> None:
    """Our echo decoder reads text rows from the LLM's table; the release gave the T2C a copy.

    Sharing is exact when the copy equals the LLM table in every row the T2C reads (`read_ids`;
    the rest of the prompt is aligner output). Otherwise the decoder would need its own table.
    """
    if t2c_table.shape != llm_table.shape:
        raise ModelLoadError(f"T2C text table {tuple(t2c_table.shape)} != LLM table {tuple(llm_table.shape)}")
    differs = (t2c_table != llm_table).any(dim=1).nonzero().flatten().tolist()
    if not differs:
        return
    read = sorted({i for i in read_ids if i in set(differs)})
    if read:
        raise ModelLoadError(
            f"the T2C's own text table differs from the LLM's in rows it reads ({read}); our echo "
            "decoder shares the LLM table and cannot hold a separate one"
        )
    log.warning("the T2C text table differs from the LLM's in %d unread rows; sharing the LLM's", len(differs))


def assemble(model: EchoXModel, state: Tensors, unused: Sequence[str]) -> EchoXModel:
    """Puts the tensors into a model built on the meta device (no copy, dtypes kept).

    Raises ModelLoadError naming every source key not consumed, every key of ours not
    produced and every shape that disagrees with the config.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    shapes = sorted(
        f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    )
    found = [(f"unused source keys {listing(unused)}", unused), (f"missing keys {listing(missing)}", missing)]
    problems = [text for text, items in [*found, (f"shape mismatches {listing(shapes)}", shapes)] if items]
    if problems:
        raise ModelLoadError("the released checkpoint does not match its config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --- tokenizer, unit language, prompt -------------------------------------------------------
def split_tokenizer(path: Path, text_vocab: int, unit_vocab: int) -> tuple[Tokenizer, list[str | None]]:
    """The text tokenizer without the unit tokens, and the unit tokens' texts by unit id."""
    data = read_json(path)
    added = [t for t in data.get("added_tokens", []) if isinstance(t, dict)]
    by_id: dict[int, str] = {int(t["id"]): str(t["content"]) for t in added}
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        by_id.update({int(i): str(tok) for tok, i in vocab.items() if int(i) >= text_vocab})
        data["model"]["vocab"] = {tok: i for tok, i in vocab.items() if int(i) < text_vocab}
    data["added_tokens"] = [t for t in added if int(t["id"]) < text_vocab]
    beyond = sorted(i for i in by_id if i >= text_vocab + unit_vocab)
    if beyond:
        raise ModelLoadError(f"{path} has tokens past the text and unit vocabularies: ids {beyond[:5]}")
    try:
        tokenizer = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
        raise ModelLoadError(f"cannot read tokenizer {path}: {exc}") from None
    return tokenizer, [by_id.get(text_vocab + k) for k in range(unit_vocab)]


def unit_pieces(texts: Sequence[str | None], num_units: int) -> list[tuple[int, ...]] | None:
    """The units each released unit token stands for; None when the tokenizer has none.

    The release joins the decoded tokens and reads every run of digits as one unit, so a token
    maps to fixed units only if no number runs across a token boundary: every `<|unit_N|>`
    token, or sentencepiece pieces that all start with '▁'. A token without digits reads as
    nothing; units >= num_units are dropped, as the release does.
    """
    if all(text is None for text in texts):
        return None
    matches = [_UNIT_TOKEN.match(text) if text is not None else None for text in texts]
    bad = [f"{i}: {texts[i]!r}" for i, m in enumerate(matches) if m is None]
    if bad:
        raise ModelLoadError(f"unit ids without a <|unit_...|> token: {listing(bad)}")
    inners = [m.group(1) for m in matches if m is not None]
    spaced = any(_SP_SPACE in inner for inner in inners)
    numbers = [_piece_numbers(inner, spaced) for inner in inners]
    unsplittable = [f"{k}: {inners[k]!r}" for k, found in enumerate(numbers) if found is None]
    if unsplittable:
        raise ModelLoadError(f"unit tokens that may continue a number into the next token: {listing(unsplittable)}")
    return [tuple(n for n in found if n < num_units) for found in numbers if found is not None]


def _piece_numbers(inner: str, spaced: bool) -> list[int] | None:
    """The numbers of one unit token; None if one may run on into the next token."""
    if not any(ch.isdigit() for ch in inner):
        return []
    if spaced and not inner.startswith(_SP_SPACE):
        return None
    parts = [p for p in inner.split(_SP_SPACE) if p] if spaced else [inner]
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def unit_language(texts: Sequence[str | None], num_units: int) -> UnitLanguageCodec:
    """Our codec, token for token the release's unit vocabulary (identity if it has none)."""
    pieces = unit_pieces(texts, num_units)
    if pieces is None:
        if len(texts) != num_units:
            raise ModelLoadError(f"the tokenizer has no unit tokens for {len(texts)} unit ids and {num_units} units")
        log.warning("the tokenizer has no unit tokens: unit token k is read as unit k")
        return UnitLanguageCodec.identity(num_units)
    codec = UnitLanguageCodec(num_units, codec_merges(pieces, num_units))
    if codec.vocab_size != len(pieces) or any(codec.decode([k]) != list(p) for k, p in enumerate(pieces)):
        raise ModelLoadError("the converted unit language does not reproduce the release's unit tokens")
    return codec


def codec_merges(pieces: Sequence[tuple[int, ...]], num_units: int) -> list[tuple[str, str]]:
    """Merges that lay our codec out exactly as the release's tokens: our codec has token u = unit
    u for u < num_units, then one token per merge of two earlier tokens, in order."""

    def misfit(k: int, why: str) -> ModelLoadError:
        units = " ".join(str(u) for u in pieces[k]) or "no units"
        return ModelLoadError(
            f"unit token {k} ({units}) {why}; our unit language holds single units first, then "
            "tokens that join two earlier ones, so this vocabulary cannot be imported as is"
        )

    if len(pieces) < num_units:
        raise ModelLoadError(f"{len(pieces)} unit tokens cannot hold the vocoder's {num_units} units one by one")
    for u in range(num_units):
        if pieces[u] != (u,):
            raise misfit(u, f"is not the single unit {u}")
    known = {piece: k for k, piece in enumerate(pieces[:num_units])}
    merges: list[tuple[str, str]] = []
    for k in range(num_units, len(pieces)):
        piece = pieces[k]
        if piece in known:
            raise misfit(k, f"repeats token {known[piece]}")
        split = next((i for i in range(1, len(piece)) if piece[:i] in known and piece[i:] in known), None)
        if split is None:
            raise misfit(k, "does not join two earlier tokens")
        merges.append((_symbols(piece[:split]), _symbols(piece[split:])))
        known[piece] = k
    return merges


def _symbols(units: Sequence[int]) -> str:
    return unit_symbols(units)


def _token_name(value: Any) -> str | None:
    """A tokenizer_config token entry: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def llama3_pad(tokenizer: Tokenizer, tokenizer_config: Mapping[str, Any], eos: str) -> str:
    """The pad token of a Llama-3 tokenizer: tokenizer_config's, else the fine-tuning pad, else eos."""
    pad = _token_name(tokenizer_config.get("pad_token"))
    if pad is None:
        pad = "<|finetune_right_pad_id|>" if tokenizer.token_to_id("<|finetune_right_pad_id|>") is not None else eos
    return pad


def official_chat_format(tokenizer: Tokenizer, tokenizer_config: Mapping[str, Any]) -> ChatFormat:
    """The release's Llama-3 prompt, exactly. Its tokenizer adds <|begin_of_text|> to every string
    it encodes, so that id appears inside the role headers and before each message body."""
    eos = _token_name(tokenizer_config.get("eos_token")) or "<|eot_id|>"
    pad = llama3_pad(tokenizer, tokenizer_config, eos)
    bot = "<|begin_of_text|>"

    def header(role: str) -> str:
        return f"<|start_header_id|>{bot}{role}<|end_header_id|>"

    return ChatFormat(
        bos=bot,
        eos=eos,
        system=f"{header('system')}{bot}\n{bot}{OFFICIAL_SYSTEM_MESSAGE}{eos}",
        user_prefix=header("user"),
        user_suffix=eos,
        assistant_prefix=f"{header('assistant')}{bot}\n",
        assistant_suffix=eos,
        text_prefix=bot,
        audio_patch="<audio_patch>",
        audio_message=f"{bot}\n<audio_patch>{bot}",
        pad=pad,
        period=".",
    )
