"""The generated stubs match protos/ (they are build output, regenerated at install)."""

from __future__ import annotations

from services.common import protogen


def test_installed_stubs_match_the_proto_files() -> None:
    assert protogen.proto_files(), "no .proto files found"
    assert protogen.drift() == [], "run `python -m services.common.protogen` (make install does)"


def test_a_changed_proto_is_detected_as_drift(tmp_path) -> None:
    stale = tmp_path / "proto"
    protogen.generate(stale)
    (stale / "stages_pb2.py").write_text((stale / "stages_pb2.py").read_text() + "\n# edited by hand\n")
    assert protogen.drift(stale) == ["stages_pb2.py"]


def test_generated_imports_do_not_collide_with_the_echox_library() -> None:
    from services.proto import converse_pb2, converse_pb2_grpc

    assert converse_pb2.DESCRIPTOR.package == "echox.v1"
    assert hasattr(converse_pb2_grpc, "ConverseServicer")
