"""Stages `lm` and `asr` with `import: PATH`: a tiny random HF Llama and Whisper folder become the
stages' outputs unchanged (same logits, same encoder states), and a model of another preset is
assembled from them. Also `llm_overrides` (a reduced 3b architecture) and the folder errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperModel

from echox.checkpoint import load_part_weights, read_part_config, save_part
from echox.errors import ConfigError, ModelLoadError
from echox.models.echo_decoder import EchoDecoder
from echox.models.llm import LLMConfig, build_llm
from echox.models.presets import get_preset
from echox.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from echox.models.vocoders import build_vocoder
from echox.tokenizer import ChatFormat
from echox.units.codec import UnitLanguageCodec
from services.common.settings import get_settings
from tests.unit.conftest import micro_config
from tests.unit.test_lm_stage import FACTS, SMOKE_SETTINGS
from training.assemble import assemble_parts
from training.stage import DONE_FILE, StageContext, run_stage
from training.stages import asr, lm

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BYTES = 256
HIDDEN, HEADS = 64, 4
MELS, WINDOW, D_ENC = 80, 50, 32
NUM_UNITS = 12


def byte_tokenizer(specials: list[str]) -> Tokenizer:
    """Byte-level BPE without merges: the 256 byte symbols, then `specials` (no <audio_patch>)."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def write_llama(folder: Path, tied: bool, specials: list[str] = LLAMA3_SPECIALS) -> LlamaForCausalLM:
    """A random 2-layer Llama-3-style folder (llama3 RoPE scaling); the untied one in shards."""
    tokenizer = byte_tokenizer(specials)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="100KB" if not tied else "50MB")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    return model


def write_whisper(folder: Path) -> WhisperModel:
    config = WhisperConfig(
        d_model=D_ENC, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=MELS, max_source_positions=WINDOW,
        max_target_positions=16, vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(1)
    model = WhisperModel(config).eval()
    model.save_pretrained(folder)
    return model


def run_import(run: Path, stage: str, folder: Path, preset: str = "tiny") -> dict[str, Any]:
    fn = lm.run if stage == "lm" else asr.run
    return run_stage(fn, StageContext(run_dir=run, stage=stage, settings={"import": str(folder)}, preset=preset))


def load_llm(lm_dir: Path) -> Any:  # a HF causal LM
    return load_part_weights(lm_dir, "llm", build_llm(read_part_config(lm_dir, "llm", LLMConfig))).eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM, WhisperModel]:
    """A run whose lm and asr stages imported a tied Llama and a Whisper."""
    source, run = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("run")
    llama, whisper = write_llama(source / "llama", tied=True), write_whisper(source / "whisper")
    run_import(run, "lm", source / "llama", preset="3b")
    run_import(run, "asr", source / "whisper", preset="3b")
    return run, llama, whisper


@pytest.mark.parametrize("tied", [True, False])
def test_imported_llm_gives_the_hf_logits_and_grows_for_audio_patch(tmp_path: Path, tied: bool) -> None:
    reference = write_llama(tmp_path / "llama", tied)
    result = run_import(tmp_path / "run", "lm", tmp_path / "llama")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file() != tied  # shards read too
    out = tmp_path / "run" / "lm"
    llm = load_llm(out)
    ids = torch.randint(0, BYTES + len(LLAMA3_SPECIALS), (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, logits = reference(ids).logits, llm(ids).logits
    known = reference.config.vocab_size
    torch.testing.assert_close(logits[..., :known], expected, rtol=1e-5, atol=1e-5)
    table = llm.get_input_embeddings().weight
    mean = reference.model.embed_tokens.weight.mean(dim=0)
    torch.testing.assert_close(table[known:], mean.expand(table.shape[0] - known, -1))  # new rows: the mean
    assert (llm.lm_head.weight is table) == tied
    tokenizer = lm.load_lm_tokenizer(out)
    assert tokenizer.audio_patch_id == known and tokenizer.vocab_size == known + 1
    assert result["added_tokens"] == ["<audio_patch>"] and result["chat_format"] == "llama3"
    assert result["model_vocab_size"] == table.shape[0] == lm.round_up(known + 1, lm.VOCAB_MULTIPLE)
    assert result["tokenizer_vocab_size"] == known + 1
    assert result["imported"] == str(tmp_path / "llama")
    assert result["parameters"] == sum(p.numel() for p in llm.parameters())
    assert not (out / lm.CHECKPOINT_DIR).exists()  # nothing trained


def test_imported_tokenizer_speaks_the_llama3_chat_format(imported: tuple[Path, Any, Any]) -> None:
    tokenizer = lm.load_lm_tokenizer(imported[0] / "lm")
    prompt = tokenizer.backend.decode(tokenizer.prompt_ids(question="Hi"), skip_special_tokens=False)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tokenizer.audio_patch_id in tokenizer.prompt_ids()
    assert tokenizer.eos_id == tokenizer.pad_id == tokenizer.special_id("<|eot_id|>")


def test_a_tokenizer_without_llama3_headers_gets_our_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_llama(tmp_path / "pretrained" / "llama", tied=True, specials=[])
    monkeypatch.setenv("ECHOX_DATA_ROOT", str(tmp_path))
    get_settings.cache_clear()  # an earlier test may have read the settings of this process
    try:
        result = run_import(tmp_path / "run", "lm", Path("pretrained/llama"))  # relative: under the data root
    finally:
        get_settings.cache_clear()
    assert result["imported"] == str(tmp_path / "pretrained" / "llama")
    assert result["chat_format"] == "echox"
    assert result["added_tokens"] == ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<audio_patch>"]
    tokenizer = lm.load_lm_tokenizer(tmp_path / "run" / "lm")
    assert tokenizer.chat == ChatFormat() and tokenizer.vocab_size == BYTES + 6


def test_imported_whisper_encoder_gives_the_hf_states(imported: tuple[Path, Any, WhisperModel]) -> None:
    run, _, whisper = imported
    config = read_part_config(run / "asr", asr.PART_NAME, SpeechEncoderConfig)
    assert (config.d_model, config.num_layers, config.max_source_positions) == (D_ENC, 2, WINDOW)
    assert config.trim_to_audio == get_preset("3b").encoder.trim_to_audio
    encoder = load_part_weights(run / "asr", asr.PART_NAME, SpeechEncoder(config)).eval()
    features = torch.randn(2, MELS, 2 * WINDOW, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder(features), whisper.encoder(features).last_hidden_state)
    done = json.loads((run / "asr" / DONE_FILE).read_text())
    assert done["encoder_parameters"] == sum(p.numel() for p in whisper.encoder.parameters())


def write_speaking_parts(run: Path, llm: LLMConfig) -> None:
    """Stand-in finished t2c, unit_language and vocoder stages sized for the imported LLM."""
    micro = micro_config()
    codec = UnitLanguageCodec.identity(NUM_UNITS)
    echo = micro.echo_decoder.replace(
        text_vocab_size=llm.vocab_size, text_dim=llm.hidden_size, unit_vocab_size=codec.vocab_size
    )
    vocoder = micro.vocoder.replace(num_units=NUM_UNITS)
    for stage in ("t2c", "unit_language", "vocoder"):
        (run / stage).mkdir()
        (run / stage / DONE_FILE).write_text("{}\n")
    save_part(run / "t2c", "echo_decoder", EchoDecoder(echo), echo)
    codec.save(run / "unit_language" / "unit_language.json")
    save_part(run / "vocoder", "vocoder", build_vocoder(vocoder), vocoder)


def test_assemble_parts_builds_the_preset_passed(imported: tuple[Path, LlamaForCausalLM, WhisperModel]) -> None:
    run, llama, _ = imported
    write_speaking_parts(run, read_part_config(run / "lm", "llm", LLMConfig))
    echox = assemble_parts(run, preset="3b")
    config, paper = echox.config, get_preset("3b")
    assert (config.max_answer_tokens, config.segmenter) == (paper.max_answer_tokens, paper.segmenter)
    assert (config.adapter.encoder_dim, config.adapter.hidden_size, config.adapter.num_heads) == (D_ENC, HIDDEN, HEADS)
    assert config.chat == echox.tokenizer.chat and echox.tokenizer.chat.bos == "<|begin_of_text|>"
    ids = torch.tensor([[7, 80, 200, 256, 260]])
    with torch.no_grad():
        logits = echox.model.llm(ids).logits[..., : llama.config.vocab_size]
        torch.testing.assert_close(logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    assert assemble_parts(run).config.max_answer_tokens == get_preset("tiny").max_answer_tokens


def test_llm_overrides_train_a_reduced_3b_architecture(tmp_path: Path) -> None:
    overrides = {"num_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2}
    settings = {**SMOKE_SETTINGS, "steps": 2, "limit_facts": 4, "llm_overrides": overrides}
    ctx = StageContext(run_dir=tmp_path, stage="lm", settings=settings, facts=FACTS, preset="3b")
    result = run_stage(lm.run, ctx)
    config = read_part_config(tmp_path / "lm", "llm", LLMConfig)
    paper = get_preset("3b").llm
    assert config == paper.replace(**overrides, vocab_size=result["model_vocab_size"])
    assert config.extra == paper.extra  # the llama3 RoPE scaling stays
    assert result["steps_done"] == 2 and result["parameters"] == sum(p.numel() for p in load_llm(ctx.out).parameters())
    assert lm.load_lm_tokenizer(ctx.out).chat == ChatFormat()  # the trained path saves its format too


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"llm_overrides": {"num_layer": 2}}, r"unknown keys \['num_layer'\]"),
        ({"llm_overrides": {"vocab_size": 64}}, "vocab_size follows the tokenizer"),
        ({"import": "/x", "llm_overrides": {"num_layers": 2}}, "not an imported one"),
    ],
)
def test_bad_lm_settings_are_config_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lm.LMSettings.from_mapping(settings)


def test_missing_or_malformed_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no HF LLM folder at .*nowhere"):
        run_import(tmp_path / "run", "lm", tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=r"no HF Whisper folder at .*nowhere"):
        run_import(tmp_path / "run", "asr", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"empty is not a HF causal-LM folder: tokenizer.json is missing; no LLM"):
        run_import(tmp_path / "run", "lm", tmp_path / "empty")
    write_llama(tmp_path / "llama", tied=True)
    shutil.copytree(tmp_path / "llama", tmp_path / "short")
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    (tmp_path / "short" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ModelLoadError, match=r"short: the weights do not fit its config.json: .*model.layers.1"):
        run_import(tmp_path / "run", "lm", tmp_path / "short")
    assert not (tmp_path / "run" / "lm" / DONE_FILE).exists()
