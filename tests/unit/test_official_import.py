"""Importing a released EchoX checkpoint: a tiny folder in the official layout, converted and
checked module by module against direct computations with the official tensors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, WhisperConfig, WhisperForConditionalGeneration

from echox.checkpoint import EchoX
from echox.cli.main import main
from echox.convert.official import (
    T2C_TABLE,
    check_t2c_table,
    import_official,
    llm_config_from_official,
    map_state_dict,
    rename,
    unit_language,
    unit_pieces,
)
from echox.errors import ModelLoadError
from echox.models.echox import OFFICIAL_T2C_PREFIX
from echox.models.llm import build_llm

V = 128257  # Llama-3's 128256 + <audio_patch>: the ids of the released prompts all exist
H, HEADS, KV, FF, LAYERS = 16, 4, 2, 32, 3
D_ENC, MELS, WINDOW = 16, 80, 50
# Unit tokens at V..V+12 in sentencepiece style, as the release decodes them: the 10 single
# units, then tokens joining two earlier ones.
UNIT_PIECES = [*((u,) for u in range(10)), (1, 2), (1, 2, 3), (7, 0)]
UNIT_TOKENS = ["<|unit_" + "".join(f"▁{u}" for u in piece) + "|>" for piece in UNIT_PIECES]
U = len(UNIT_TOKENS)
SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
            128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128009: "<|eot_id|>"}
VOCODER_JSON: dict[str, Any] = {
    "resblock": "1", "upsample_rates": [2, 2], "upsample_kernel_sizes": [4, 4], "upsample_initial_channel": 16,
    "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3]], "num_embeddings": 10, "embedding_dim": 8,
    "model_in_dim": 8, "segment_size": 8960, "code_hop_size": 320, "f0": False, "multispkr": False,
    "dur_predictor_params": {"encoder_embed_dim": 8, "var_pred_hidden_dim": 8, "var_pred_kernel_size": 3,
                             "var_pred_dropout": 0.5},
    "sampling_rate": 16000,
}


def official_config() -> dict[str, Any]:
    """config.json as the release writes it: a Llama config (transformers 4 keys) + EchoX fields."""
    return {
        "architectures": ["EchoXForCausalLM"], "model_type": "EchoX", "vocab_size": V, "hidden_size": H,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "adapter_size": D_ENC, "audio_tower": "./whisper-large-v3", "unit_output": "finetune_kd_online",
        "unit_model": "large", "unit_vocab_size": U, "torch_dtype": "bfloat16",
    }


def _llama_config(**changes: Any) -> LlamaConfig:
    cfg = {k: v for k, v in official_config().items() if k not in ("architectures", "model_type")}
    return LlamaConfig(**{**cfg, **changes})


def _noisy(state: dict[str, torch.Tensor], prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Adds noise so no tensor is an init constant (norm weights stay near 1)."""
    return {prefix + k: (v + 0.1 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in state.items()}


def official_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every EchoXForCausalLM tensor, named and shaped as in the release (unit_model 'large')."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = _noisy(LlamaForCausalLM(_llama_config()).state_dict(), "", gen)
    layer = nn.TransformerEncoderLayer(H, HEADS, 2 * H, 0.1, norm_first=True)  # batch_first=False, as released
    modules: dict[str, nn.Module] = {
        "model.mm_projector1.": nn.Linear(2 * D_ENC, H),
        "model.asr_transformer_encoder.": nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
        "model.lbm.encoder_attn.": nn.MultiheadAttention(H, HEADS, dropout=0.1, batch_first=True),
        "model.lbm.atten_layer_norm.": nn.LayerNorm(H),
        "model.out_norm.": nn.LayerNorm(H),
        "model.audio_feature_head.": nn.Linear(H, V, bias=False),
        "unit_translator.model.": LlamaModel(_llama_config(num_hidden_layers=2)),  # 'large': 2 LLM-size layers
        "unit_translator.unit_embedding.": nn.Linear(H, U, bias=False),
        "unit_translator.adapter.": nn.Linear(H, H),
        "unit_translator.lm_head.": nn.Linear(H, V + U, bias=False),
        "unit_translator.aligner_MLP.": nn.Sequential(nn.Linear(H, FF), nn.ReLU(), nn.Dropout(0.1), nn.Linear(FF, H)),
    }
    for prefix, module in modules.items():
        t.update(_noisy(module.state_dict(), prefix, gen))
    t[T2C_TABLE] = t["model.embed_tokens.weight"].clone()  # stage II froze a copy of the LLM table
    return {k: v.to(torch.bfloat16) for k, v in t.items()}


def official_tokenizer() -> Tokenizer:
    """Byte-level BPE laid out like Llama-3's: 128000 ids, its specials, then <audio_patch>
    and the unit tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # '.' is 13 and '\n' 198, as in Llama-3
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), 128000)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [SPECIALS.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, 128256)]
    tokenizer.add_special_tokens([*specials, "<audio_patch>", *UNIT_TOKENS])
    return tokenizer


def write_whisper(folder: Path) -> None:
    """A tiny HF Whisper folder with WhisperForConditionalGeneration keys (model.encoder.*), fp16."""
    config = WhisperConfig(
        d_model=D_ENC, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=MELS, max_source_positions=WINDOW,
        max_target_positions=16, vocab_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(1)
    model = WhisperForConditionalGeneration(config)
    folder.mkdir(parents=True)
    config.to_json_file(str(folder / "config.json"))
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "proj_out.weight"}
    save_file(_noisy(state, "", torch.Generator().manual_seed(2)), str(folder / "model.safetensors"))


def fairseq_generator(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """fairseq CodeGenerator tensors (old-style weight norm: weight_g over dim 0, weight_v)."""
    sd: dict[str, torch.Tensor] = {"dict.weight": torch.randn(10, 8, generator=gen)}

    def conv(name: str, shape: tuple[int, ...]) -> None:
        sd[f"{name}.weight_g"] = torch.rand((shape[0], 1, 1), generator=gen) + 0.5
        sd[f"{name}.weight_v"] = torch.randn(shape, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(shape[1] if name.startswith("ups") else shape[0], generator=gen)

    for i, cin in ((1, 8), (2, 8)):
        sd[f"dur_predictor.conv{i}.0.weight"] = 0.3 * torch.randn(8, cin, 3, generator=gen)
        sd[f"dur_predictor.conv{i}.0.bias"] = 0.1 * torch.randn(8, generator=gen)
        sd[f"dur_predictor.ln{i}.weight"] = 1 + 0.1 * torch.randn(8, generator=gen)
        sd[f"dur_predictor.ln{i}.bias"] = 0.1 * torch.randn(8, generator=gen)
    sd["dur_predictor.proj.weight"] = 0.3 * torch.randn(1, 8, generator=gen)
    sd["dur_predictor.proj.bias"] = torch.tensor([1.0])
    conv("conv_pre", (16, 8, 7))
    for i, ch in enumerate((8, 4)):  # one resblock (kernel 3, dilations 1 and 3) per upsampler
        conv(f"ups.{i}", (2 * ch, ch, 4))  # ConvTranspose1d weights are [in, out, k]
        for name in ("convs1.0", "convs1.1", "convs2.0", "convs2.1"):
            conv(f"resblocks.{i}.{name}", (ch, ch, 3))
    conv("conv_post", (1, 4, 7))
    return sd


@dataclasses.dataclass
class Official:
    """A released-layout folder and the tensors written into it."""

    src: Path
    tensors: dict[str, torch.Tensor]
    vocoder: dict[str, torch.Tensor]


def write_official(src: Path, seed: int = 0) -> Official:
    """SRC/{config.json, model-0000k-of-00002.safetensors + index, tokenizer(.json, _config.json),
    whisper-large-v3/, vocoder/{g_00500000, vocoder_config.json}}."""
    src.mkdir(parents=True)
    tensors = official_tensors(seed)
    (src / "config.json").write_text(json.dumps(official_config()))
    # Shard 2 holds the small speech modules, so a test can corrupt it cheaply.
    shards: dict[str, dict[str, torch.Tensor]] = {"model-00001-of-00002.safetensors": {},
                                                  "model-00002-of-00002.safetensors": {}}
    for key, tensor in tensors.items():
        small = key.startswith(("model.mm_", "model.asr", "model.lbm", "model.out_norm"))
        shards[f"model-0000{2 if small else 1}-of-00002.safetensors"][key] = tensor
    for name, part in shards.items():
        save_file(part, str(src / name))
    weight_map = {k: n for n, part in shards.items() for k in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    official_tokenizer().save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>", "pad_token": None}))
    write_whisper(src / "whisper-large-v3")
    (src / "vocoder").mkdir()
    vocoder = fairseq_generator(torch.Generator().manual_seed(seed + 3))
    torch.save({"generator": vocoder}, src / "vocoder" / "g_00500000")
    (src / "vocoder" / "vocoder_config.json").write_text(json.dumps(VOCODER_JSON))
    return Official(src, tensors, vocoder)


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Official:
    return write_official(tmp_path_factory.mktemp("release") / "EchoX-3B")


@pytest.fixture(scope="module")
def imported_dir(official: Official, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_official(official.src, tmp_path_factory.mktemp("ours") / "model")


@pytest.fixture(scope="module")
def imported(imported_dir: Path) -> EchoX:
    return EchoX.from_pretrained(imported_dir)


def f32(official: Official, key: str) -> torch.Tensor:
    return official.tensors[key].float()


def _ln(o: Official, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), f32(o, f"{name}.weight"), f32(o, f"{name}.bias"))


def _lin(o: Official, name: str, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    return F.linear(x, f32(o, f"{name}.weight"), f32(o, f"{name}.bias") if bias else None)


# ---------------------------------------------------------------- the whole import


def test_every_official_tensor_is_stored_unchanged(official: Official, imported_dir: Path) -> None:
    saved = load_file(str(imported_dir / "model.safetensors"))
    consumed = set()
    for key, tensor in official.tensors.items():
        if key == T2C_TABLE:  # shared with the LLM's table: equal, stored once
            assert torch.equal(tensor, official.tensors["model.embed_tokens.weight"])
            continue
        target = rename(key)
        assert target in saved, key
        assert torch.equal(saved[target], tensor), key  # the dtype is kept too
        consumed.add(target)
    whisper = load_file(str(official.src / "whisper-large-v3" / "model.safetensors"))
    encoder = {f"speech_encoder.whisper.{k[len('model.encoder.'):]}" for k in whisper if k.startswith("model.encoder.")}
    vocoder = {k for k in saved if k.startswith("vocoder.")}
    assert len(vocoder) == len(official.vocoder)
    assert set(saved) == consumed | encoder | vocoder  # nothing made up, nothing left out


def test_config_sizes_and_switches(imported: EchoX) -> None:
    c = imported.config
    assert c.official_compat and c.adapter.official_batch_first_quirk and c.adapter.lookback_mask_dropped
    assert not c.encoder.trim_to_audio and c.encoder.max_source_positions == WINDOW
    assert (c.llm.vocab_size, c.llm.hidden_size, c.llm.num_layers, c.llm.tie_word_embeddings) == (V, H, LAYERS, False)
    t2c = c.echo_decoder
    assert (t2c.num_layers, t2c.hidden_size, t2c.num_heads, t2c.num_kv_heads) == (2, H, HEADS, KV)
    assert (t2c.unit_vocab_size, t2c.aligner_intermediate_size, t2c.max_position_embeddings) == (U, FF, 2048)
    assert c.vocoder.num_units == 10 and c.vocoder.upsample_rates == (2, 2)


def test_tokenizer_and_unit_language(imported: EchoX) -> None:
    tok = imported.tokenizer
    ids = (tok.bos_id, tok.eos_id, tok.pad_id, tok.audio_patch_id, tok.period_id)
    assert ids == (128000, 128009, 128004, 128256, 13)
    assert tok.vocab_size == V  # the unit tokens moved to the codec
    assert tok.backend.token_to_id(UNIT_TOKENS[0]) is None
    assert [imported.codec.decode([k]) for k in range(U)] == [list(p) for p in UNIT_PIECES]
    assert imported.codec.encode([1, 2, 3, 5, 7, 0]) == [11, 5, 12]


def test_llm_logits_equal_hf_llama(official: Official, imported: EchoX) -> None:
    reference = LlamaForCausalLM(_llama_config()).eval()
    llm_keys = {k: v.float() for k, v in official.tensors.items() if (rename(k) or "").startswith("llm.")}
    reference.load_state_dict(llm_keys)
    ids = torch.tensor([[128000, 128006, 882, 128007, 198, 128256, 13, 5]])
    with torch.no_grad():
        torch.testing.assert_close(imported.model.llm(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_whisper_encoder_equals_hf(official: Official, imported: EchoX) -> None:
    folder = official.src / "whisper-large-v3"
    reference = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).model.encoder.eval()
    features = torch.randn(1, MELS, 2 * WINDOW, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(imported.model.speech_encoder(features), reference(features).last_hidden_state)


def test_adapter_quirk_and_ctc_head_equal_a_direct_computation(official: Official, imported: EchoX) -> None:
    enc = torch.randn(1, 12, D_ENC, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states, logits = imported.model.adapt(enc)
    # Released layer: batch_first=False on [1 audio, T, H], so each frame is a sequence of one:
    # its attention weight is 1 and self-attention reduces to out_proj(v_proj(norm1(x))).
    layer = "model.asr_transformer_encoder.layers.0"
    x = _lin(official, "model.mm_projector1", enc.reshape(1, 6, 2 * D_ENC))
    w_in, b_in = f32(official, f"{layer}.self_attn.in_proj_weight"), f32(official, f"{layer}.self_attn.in_proj_bias")
    v = F.linear(_ln(official, f"{layer}.norm1", x), w_in[2 * H :], b_in[2 * H :])
    x = x + _lin(official, f"{layer}.self_attn.out_proj", v)
    hidden = F.relu(_lin(official, f"{layer}.linear1", _ln(official, f"{layer}.norm2", x)))
    expected = _ln(official, "model.out_norm", x + _lin(official, f"{layer}.linear2", hidden))
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(logits, _lin(official, "model.audio_feature_head", expected, bias=False))


def test_lookback_masks_dropped_frames_like_the_release(official: Official, imported: EchoX) -> None:
    states = torch.randn(1, 7, H, generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([[True, False, True, True, False, False, True]])
    with torch.no_grad():
        (ours,) = imported.model.lookback(states, keep)
    attn = "model.lbm.encoder_attn"
    w, b = f32(official, f"{attn}.in_proj_weight"), f32(official, f"{attn}.in_proj_bias")
    kept = states[0][keep[0]]
    qkv = [F.linear(x, w[i * H : (i + 1) * H], b[i * H : (i + 1) * H]) for i, x in enumerate((kept, *states, *states))]
    heads = [t.reshape(t.shape[0], HEADS, H // HEADS).transpose(0, 1) for t in qkv]
    scores = heads[0] @ heads[1].transpose(1, 2) / (H // HEADS) ** 0.5
    scores = scores.masked_fill(~keep[0], float("-inf"))  # the released key_padding_mask
    attended = (scores.softmax(-1) @ heads[2]).transpose(0, 1).reshape(-1, H)
    expected = _ln(official, "model.lbm.atten_layer_norm", _lin(official, f"{attn}.out_proj", attended) + kept)
    torch.testing.assert_close(ours, expected)


def test_t2c_logits_equal_the_release_computation(official: Official, imported: EchoX) -> None:
    model = imported.model
    hidden = torch.randn(5, H, generator=torch.Generator().manual_seed(3))
    prefix = torch.tensor(OFFICIAL_T2C_PREFIX)  # with the 12800 quirk
    units = torch.tensor([V + 11, V])
    with torch.no_grad():
        table = model.input_table()
        embeds = torch.cat([model.echo_decoder.embed(prefix, table), model.aligner(hidden),
                            model.echo_decoder.embed(units, table)])
        ours, _ = model.echo_decoder(embeds.unsqueeze(0))
    # Release: rows of the T2C's own table and of unit_embedding, aligner_MLP, adapter, Llama, head.
    reference = LlamaModel(_llama_config(num_hidden_layers=2, max_position_embeddings=2048)).eval()
    prefix_len = len("unit_translator.model.")
    reference.load_state_dict({k[prefix_len:]: v.float() for k, v in official.tensors.items()
                               if k.startswith("unit_translator.model.")})
    mlp = "unit_translator.aligner_MLP"
    aligned = _lin(official, f"{mlp}.3", F.relu(_lin(official, f"{mlp}.0", hidden)))
    inputs = torch.cat([f32(official, T2C_TABLE)[prefix], aligned,
                        f32(official, "unit_translator.unit_embedding.weight")[units - V]])
    with torch.no_grad():
        out = reference(inputs_embeds=_lin(official, "unit_translator.adapter", inputs).unsqueeze(0))
    expected = _lin(official, "unit_translator.lm_head", out.last_hidden_state, bias=False)
    assert ours.shape == (1, len(prefix) + 7, V + U)
    torch.testing.assert_close(ours, expected)


def _wn(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    v = sd[f"{name}.weight_v"]
    return sd[f"{name}.weight_g"] * v / v.flatten(1).norm(dim=1).reshape(-1, 1, 1)


def reference_vocoder(sd: dict[str, torch.Tensor], units: torch.Tensor) -> torch.Tensor:
    """fairseq's CodeGenerator with duration prediction, from its own tensors."""
    x = sd["dict.weight"][units].T.unsqueeze(0)  # [1, C, N]
    h = x
    for i in (1, 2):
        h = F.relu(F.conv1d(h, sd[f"dur_predictor.conv{i}.0.weight"], sd[f"dur_predictor.conv{i}.0.bias"], padding=1))
        h = F.layer_norm(h.transpose(1, 2), (8,), sd[f"dur_predictor.ln{i}.weight"], sd[f"dur_predictor.ln{i}.bias"])
        h = h.transpose(1, 2)
    log_dur = F.linear(h.transpose(1, 2), sd["dur_predictor.proj.weight"], sd["dur_predictor.proj.bias"]).flatten()
    x = torch.repeat_interleave(x, torch.clamp(torch.round(log_dur.exp() - 1).long(), min=1), dim=2)
    x = F.conv1d(x, _wn(sd, "conv_pre"), sd["conv_pre.bias"], padding=3)
    for i in range(2):
        x = F.conv_transpose1d(F.leaky_relu(x, 0.1), _wn(sd, f"ups.{i}"), sd[f"ups.{i}.bias"], stride=2, padding=1)
        for j, d in enumerate((1, 3)):  # one kernel size: the mean over resblocks is the block
            c1, c2 = f"resblocks.{i}.convs1.{j}", f"resblocks.{i}.convs2.{j}"
            xt = F.conv1d(F.leaky_relu(x, 0.1), _wn(sd, c1), sd[f"{c1}.bias"], padding=d, dilation=d)
            x = x + F.conv1d(F.leaky_relu(xt, 0.1), _wn(sd, c2), sd[f"{c2}.bias"], padding=1)
    x = F.conv1d(F.leaky_relu(x), _wn(sd, "conv_post"), sd["conv_post.bias"], padding=3)
    return torch.tanh(x).flatten()


def test_vocoder_equals_fairseq_computation(official: Official, imported: EchoX) -> None:
    units = torch.tensor([1, 2, 4, 5, 8, 0, 7])
    torch.testing.assert_close(imported.model.vocoder.synthesize(units), reference_vocoder(official.vocoder, units))


# ---------------------------------------------------------------- errors and the CLI


def _corrupt(official: Official, tmp_path: Path, drop: str | None = None, add: str | None = None) -> Path:
    src = tmp_path / "corrupt"
    shutil.copytree(official.src, src)
    shard = src / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, str(shard))
    weight_map = {k: shard.name for k in tensors} | {k: "model-00001-of-00002.safetensors"
                                                     for k in load_file(str(src / "model-00001-of-00002.safetensors"))}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return src


def test_missing_and_unknown_keys_are_named(official: Official, tmp_path: Path) -> None:
    src = _corrupt(official, tmp_path, drop="model.lbm.atten_layer_norm.bias", add="model.lbm.gate.weight")
    with pytest.raises(ModelLoadError) as info:
        import_official(src, tmp_path / "out")
    message = str(info.value)
    assert "unused source keys [model.lbm.gate.weight]" in message
    assert "missing keys [lookback.norm.bias]" in message
    assert not (tmp_path / "out").exists()


def test_incomplete_folder_names_what_is_missing(official: Official, tmp_path: Path) -> None:
    src = tmp_path / "partial"
    shutil.copytree(official.src, src, ignore=shutil.ignore_patterns("g_00500000", "whisper-large-v3"))
    with pytest.raises(ModelLoadError, match="missing g_00500000, whisper/"):
        import_official(src, tmp_path / "out")


def test_cli_imports_and_the_folder_loads(official: Official, tmp_path: Path) -> None:
    out = tmp_path / "cli-model"
    assert main(["model", "import-official", str(official.src), "--out", str(out)]) == 0
    loaded = EchoX.from_pretrained(out)
    assert loaded.config.official_compat
    assert main(["model", "import-official", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


# ---------------------------------------------------------------- pieces


def test_llama3_rope_scaling_is_carried_to_the_llm() -> None:
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = {**official_config(), "vocab_size": 64, "rope_scaling": scaling}
    torch.manual_seed(0)
    reference = LlamaForCausalLM(_llama_config(vocab_size=64, rope_scaling=scaling)).eval()
    state = reference.state_dict()
    ours = build_llm(llm_config_from_official(cfg, {"lm_head.weight": state["lm_head.weight"]})).eval()
    ours.load_state_dict(state)
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["<|unit_3|>", "<|unit_0|>", "<|unit_12|>"], [(3,), (0,), ()]),  # one unit per token; 12 dropped
        (["<|unit_▁3▁1|>", "<|unit_▁5|>", "<|unit_<unk>|>"], [(3, 1), (5,), ()]),  # sentencepiece pieces
        ([None, None], None),  # no unit tokens
    ],
)
def test_unit_pieces(texts: list[str | None], expected: list[tuple[int, ...]] | None) -> None:
    assert unit_pieces(texts, num_units=10) == expected


@pytest.mark.parametrize("texts", [["<|unit_▁3|>", "<|unit_4|>"], ["<|unit_3|>", "<other>"], ["<|unit_3|>", None]])
def test_unit_pieces_rejects_what_cannot_map_to_fixed_units(texts: list[str | None]) -> None:
    with pytest.raises(ModelLoadError):
        unit_pieces(texts, num_units=10)


def test_unit_language_identity_and_layout() -> None:
    assert unit_language([None] * 4, num_units=4).decode([3, 0]) == [3, 0]
    plain = unit_language([f"<|unit_{u}|>" for u in range(4)], num_units=4)
    assert plain.vocab_size == 4 and plain.encode([2, 1]) == [2, 1]
    with pytest.raises(ModelLoadError, match=r"unit token 0 \(1\) is not the single unit 0"):
        unit_language(["<|unit_1|>", "<|unit_0|>"], num_units=2)
    with pytest.raises(ModelLoadError, match="does not join two earlier tokens"):
        unit_language(["<|unit_▁0|>", "<|unit_▁1|>", "<|unit_▁2|>", "<|unit_▁0▁1▁2▁0|>"], num_units=3)


@pytest.mark.parametrize("head", ["absent", "equal"])
def test_a_tied_llm_head_is_one_tensor(official: Official, head: str) -> None:
    tensors = dict(official.tensors)
    if head == "absent":
        del tensors["lm_head.weight"]
    else:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    assert llm_config_from_official(official_config(), tensors).tie_word_embeddings
    expected = {"llm.model.embed_tokens.weight", "llm.lm_head.weight"}
    state, _ = map_state_dict(tensors, expected, tied=True)
    assert state["llm.lm_head.weight"] is state["llm.model.embed_tokens.weight"]  # saved once


def test_t2c_table_may_differ_only_in_rows_it_never_reads() -> None:
    llm = torch.randn(8, 4)
    t2c = llm.clone()
    t2c[5] += 1
    check_t2c_table(t2c, llm, read_ids=(0, 1, 2))  # row 5 is unread: shared
    with pytest.raises(ModelLoadError, match=r"rows it reads \(\[5\]\)"):
        check_t2c_table(t2c, llm, read_ids=(0, 5))


def test_spoken_turn_prompt_is_the_releases(imported: EchoX) -> None:
    """The release's tokenizer puts <|begin_of_text|> before every piece it encodes; the
    imported chat format reproduces that prompt id for id, system block included."""
    from echox.convert.official import OFFICIAL_SYSTEM_MESSAGE

    tok = imported.tokenizer
    bot, sh, eh, eot = 128000, 128006, 128007, 128009
    patch = tok.audio_patch_id

    def text(s: str) -> list[int]:
        return [bot, *tok.encode(s)]  # what the release's `tokenizer(s).input_ids` gives

    expected = [bot, sh, *text("system"), eh, *text("\n"), *text(OFFICIAL_SYSTEM_MESSAGE), eot]
    expected += [sh, *text("user"), eh, *text("\n"), patch, bot, eot]
    expected += [sh, *text("assistant"), eh, *text("\n")]
    assert tok.prompt_ids() == expected
    assert tok.eos_id == eot and tok.bos_id == bot


def test_t2c_rope_scaling_is_carried() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    from echox.convert.official import t2c_config_from_official

    tensors = official_tensors()
    llm = llm_config_from_official(official_config(), tensors)
    t2c = t2c_config_from_official({**official_config(), "rope_scaling": scaling}, tensors, llm)
    assert t2c.rope_parameters is not None and t2c.rope_parameters["rope_type"] == "llama3"
    assert t2c.to_hf().rope_parameters["factor"] == 8.0
