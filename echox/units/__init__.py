"""Speech units: deduplication and the unit-language codec."""

from echox.units.codec import UnitLanguageCodec, dedup, expand

__all__ = ["UnitLanguageCodec", "dedup", "expand"]
