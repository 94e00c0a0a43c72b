from __future__ import annotations

import json

import pytest
import torch

from echox.errors import ConfigError
from echox.models.echox import OFFICIAL_T2C_QUIRK_ID, EchoXConfig, EchoXModel
from echox.models.istft_vocoder import IstftVocoderConfig
from echox.models.presets import PRESETS, get_preset
from echox.models.speech_adapter import (
    LookBack,
    SpeechAdapter,
    SpeechAdapterConfig,
    ctc_greedy_ids,
    ctc_shrink_mask,
)
from echox.models.vocoder import VocoderConfig
from echox.models.vocoders import build_vocoder
from tests.unit.conftest import micro_config


def test_config_json_round_trip() -> None:
    for name in PRESETS:
        config = get_preset(name)
        assert EchoXConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_inconsistent_config_is_rejected() -> None:
    config = micro_config()
    with pytest.raises(ConfigError, match=r"adapter\.hidden_size"):
        config.replace(adapter=config.adapter.replace(hidden_size=64, num_heads=2, lookback_heads=2))
    with pytest.raises(ConfigError, match="unknown keys"):
        EchoXConfig.from_dict({**config.to_dict(), "surprise": 1})
    with pytest.raises(ConfigError, match="matches none of"):  # neither vocoder's keys
        EchoXConfig.from_dict({**config.to_dict(), "vocoder": {"num_units": 8, "surprise": 1}})


def test_the_vocoder_config_says_which_vocoder_a_model_has() -> None:
    from echox.models.istft_vocoder import IstftVocoder
    from echox.models.vocoder import UnitVocoder

    assert isinstance(get_preset("tiny").vocoder, IstftVocoderConfig)
    assert isinstance(get_preset("3b").vocoder, VocoderConfig)
    assert isinstance(build_vocoder(get_preset("tiny").vocoder), IstftVocoder)
    assert isinstance(build_vocoder(VocoderConfig.tiny()), UnitVocoder)


@pytest.mark.parametrize(
    ("name", "llm_b", "encoder_b"),
    [("3b", 3.21, 0.64), ("8b", 8.03, 0.64)],
)
def test_paper_presets_have_the_papers_shapes(name: str, llm_b: float, encoder_b: float) -> None:
    with torch.device("meta"):
        counts = EchoXModel(get_preset(name)).parameter_counts()
    assert abs(counts["llm"] / 1e9 - llm_b) / llm_b < 0.03
    assert abs(counts["speech_encoder"] / 1e9 - encoder_b) / encoder_b < 0.03


def test_tiny_preset_is_a_few_million_parameters() -> None:
    with torch.device("meta"):
        counts = EchoXModel(get_preset("tiny")).parameter_counts()
    assert 2e6 < counts["total"] < 15e6


def test_adapter_stacks_two_frames() -> None:
    config = SpeechAdapterConfig(encoder_dim=8, hidden_size=16, num_heads=2, lookback_heads=2)
    adapter = SpeechAdapter(config).eval()
    out = adapter(torch.randn(2, 11, 8))
    assert out.shape == (2, 5, 16)  # the odd trailing frame is dropped


def test_official_quirk_is_a_per_frame_layer_for_one_audio() -> None:
    """batch_first=False on [1, T, H] treats T as the batch: no attention across time."""
    torch.manual_seed(0)
    config = SpeechAdapterConfig(encoder_dim=8, hidden_size=16, num_heads=2, lookback_heads=2, dropout=0.0)
    quirky = SpeechAdapter(config.replace(official_batch_first_quirk=True)).eval()
    states = torch.randn(1, 10, 8)
    whole = quirky(states)
    frame_by_frame = torch.cat([quirky(states[:, 2 * i : 2 * i + 2]) for i in range(5)], dim=1)
    assert torch.allclose(whole, frame_by_frame, atol=1e-6)
    clean = SpeechAdapter(config).eval()
    clean.load_state_dict(quirky.state_dict())
    assert not torch.allclose(clean(states), whole, atol=1e-4)


def test_ctc_shrink_keeps_changes_of_argmax() -> None:
    best = torch.tensor([[3, 3, 0, 0, 5, 3, 3]])
    logits = torch.nn.functional.one_hot(best, 6).float()
    assert ctc_shrink_mask(logits).tolist() == [[True, False, True, False, True, True, False]]
    assert ctc_greedy_ids(logits[0], blank_id=0) == [3, 5, 3]


def test_lookback_masks_dropped_frames_by_default() -> None:
    torch.manual_seed(0)
    config = SpeechAdapterConfig(encoder_dim=8, hidden_size=16, num_heads=2, lookback_heads=2, dropout=0.0)
    lookback = LookBack(config).eval()
    states = torch.randn(1, 6, 16)
    keep = torch.tensor([[True, False, True, False, False, True]])
    masked = lookback(states, keep)[0]
    changed = states.clone()
    changed[0, ~keep[0]] = 100.0  # dropped frames must not matter when masked
    assert masked.shape == (3, 16)
    assert torch.allclose(lookback(changed, keep)[0], masked, atol=1e-6)
    attend_all = LookBack(config.replace(lookback_mask_dropped=False)).eval()
    attend_all.load_state_dict(lookback.state_dict())
    assert not torch.allclose(attend_all(changed, keep)[0], masked, atol=1e-3)


def test_splice_replaces_audio_patch(micro_echox) -> None:  # type: ignore[no-untyped-def]
    model, tok = micro_echox.model, micro_echox.tokenizer
    ids = torch.tensor(tok.prompt_ids())
    speech = torch.randn(7, model.config.llm.hidden_size)
    embeds = model.splice(ids, tok.audio_patch_id, [speech])
    position = ids.tolist().index(tok.audio_patch_id)
    assert embeds.shape[0] == len(ids) - 1 + 7
    assert torch.equal(embeds[position : position + 7], speech)
    table = model.llm.get_input_embeddings().weight
    assert torch.equal(embeds[:position], table[ids[:position]])
    with pytest.raises(ValueError, match="audio_patch"):
        model.splice(ids, tok.audio_patch_id, [speech, speech])


def test_encode_speech_trims_to_audio(micro_echox) -> None:  # type: ignore[no-untyped-def]
    audio = torch.randn(16_000).numpy() * 0.1
    encoding = micro_echox.model.encode_speech(audio)
    assert encoding.adapter_states.shape[0] == 25  # 50 Hz encoder, stacked by two
    assert encoding.shrunk.shape[0] == int(encoding.keep.sum())


def test_echo_decoder_text_rows_are_frozen(micro_echox) -> None:  # type: ignore[no-untyped-def]
    model = micro_echox.model
    table = model.llm.get_input_embeddings().weight
    ids = torch.tensor([[1, 2, model.config.llm.vocab_size + 3]])
    embeds = model.echo_decoder.embed(ids, table)
    embeds.sum().backward()
    assert table.grad is None and model.echo_decoder.unit_embed.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_t2c_prompt_is_clean_unless_official(micro_echox) -> None:  # type: ignore[no-untyped-def]
    model = micro_echox.model
    assert model.t2c_prefix_ids(bos_id=7) == [7] and model.t2c_suffix_ids(eos_id=9) == [9]
    official = EchoXModel.__new__(EchoXModel)
    torch.nn.Module.__init__(official)
    official.config = model.config.replace(official_compat=True)
    assert official.t2c_prefix_ids(bos_id=7)[-1] == OFFICIAL_T2C_QUIRK_ID == 12800
    assert official.t2c_suffix_ids(eos_id=9)[0] == 128009
