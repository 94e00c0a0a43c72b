from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from echox.checkpoint import CONFIG_FILE, WEIGHTS_FILE, EchoX
from echox.errors import ModelLoadError


def test_round_trip_is_bit_exact(micro_echox: EchoX, micro_model_dir: Path) -> None:
    loaded = EchoX.from_pretrained(micro_model_dir)
    assert loaded.config == micro_echox.config
    saved, restored = micro_echox.model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == restored.keys()
    for key, tensor in saved.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    assert loaded.tokenizer.encode("Paris.") == micro_echox.tokenizer.encode("Paris.")
    assert loaded.codec.encode([1, 2, 3]) == micro_echox.codec.encode([1, 2, 3])


def test_tied_llm_head_stays_tied(micro_model_dir: Path) -> None:
    llm = EchoX.from_pretrained(micro_model_dir).model.llm
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_files(tmp_path: Path, micro_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model folder"):
        EchoX.from_pretrained(tmp_path / "nope")
    folder = _copy(micro_model_dir, tmp_path / "m")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is missing"):
        EchoX.from_pretrained(folder)


def test_corrupt_weights_and_config(tmp_path: Path, micro_model_dir: Path) -> None:
    folder = _copy(micro_model_dir, tmp_path / "m")
    (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        EchoX.from_pretrained(folder)
    (folder / CONFIG_FILE).write_text("{broken")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        EchoX.from_pretrained(folder)


def test_newer_format_is_refused(tmp_path: Path, micro_model_dir: Path) -> None:
    folder = _copy(micro_model_dir, tmp_path / "m")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["format_version"] = 99
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="newer EchoX"):
        EchoX.from_pretrained(folder)


def test_weights_of_another_size_are_refused(tmp_path: Path, micro_model_dir: Path) -> None:
    folder = _copy(micro_model_dir, tmp_path / "m")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["model"]["llm"]["intermediate_size"] = 96
    meta["model"]["echo_decoder"]["aligner_intermediate_size"] = 64
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError):
        EchoX.from_pretrained(folder)


def test_half_precision_storage_halves_the_folder_and_loads_back(micro_echox: EchoX, tmp_path: Path) -> None:
    full = micro_echox.save_pretrained(tmp_path / "full")
    half = micro_echox.save_pretrained(tmp_path / "half", weights_dtype=torch.float16)
    full_bytes, half_bytes = ((f / WEIGHTS_FILE).stat().st_size for f in (full, half))
    assert half_bytes < 0.6 * full_bytes
    loaded = EchoX.from_pretrained(half)
    original = micro_echox.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert tensor.dtype == original[name].dtype, name  # cast back to the model's own type
        torch.testing.assert_close(tensor, original[name], atol=2e-3, rtol=2e-3)
    head, table = loaded.model.llm.get_output_embeddings().weight, loaded.model.input_table()
    assert head.data_ptr() == table.data_ptr()  # still tied
    assert micro_echox.model.input_table().dtype == torch.float32  # the saved model is untouched
