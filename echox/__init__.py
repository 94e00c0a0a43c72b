"""EchoX core library: models, unit language, streaming trigger and in-process inference.

This package imports torch and transformers, never infrastructure (redis, grpc, triton,
livekit, celery, fastapi): services/ and training/ build on it, not the other way round.
"""

__version__ = "0.1.0"
