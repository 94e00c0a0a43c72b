"""Converters from foreign checkpoints into the EchoX model folder."""

from echox.convert.official import import_official

__all__ = ["import_official"]
