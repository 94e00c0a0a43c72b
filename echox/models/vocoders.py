"""The unit vocoders a model folder may hold, and the one way to build either from its config.

- `UnitVocoder` (HiFi-GAN generator, `VocoderConfig`): the released EchoX vocoder's layout.
- `IstftVocoder` (network at the unit rate + signal processing, `IstftVocoderConfig`): what the
  tiny recipe trains on CPU.

A config dict is told apart by its keys (`IstftVocoderConfig` carries `architecture`), so an
`EchoXConfig` or a part file holds either without a separate type tag.
"""

from __future__ import annotations

from echox.models.istft_vocoder import IstftVocoder, IstftVocoderConfig
from echox.models.vocoder import UnitVocoder, VocoderConfig

AnyVocoderConfig = VocoderConfig | IstftVocoderConfig
AnyVocoder = UnitVocoder | IstftVocoder


def build_vocoder(config: AnyVocoderConfig) -> AnyVocoder:
    """A freshly initialised vocoder of the architecture `config` describes."""
    return IstftVocoder(config) if isinstance(config, IstftVocoderConfig) else UnitVocoder(config)
