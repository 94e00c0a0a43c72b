"""EchoX model modules: one file per module, each with its frozen config dataclass."""
