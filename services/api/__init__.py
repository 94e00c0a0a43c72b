"""The control plane (FastAPI): API keys, sessions, training jobs through Celery, models and
their publication to Triton, health, readiness and metrics. `python -m services.api` serves it;
`create_app` builds it for embedding (echox serve mounts the gateway's routes on it)."""

from services.api.app import create_app

__all__ = ["create_app"]
