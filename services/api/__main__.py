"""`python -m services.api`: the control plane on ECHOX_HTTP_HOST:ECHOX_HTTP_PORT (uvicorn),
with key-less Prometheus metrics on ECHOX_METRICS_PORT when set."""

from __future__ import annotations

import uvicorn

from services.api.app import create_app
from services.common.logs import setup_logging
from services.common.metrics import serve_metrics
from services.common.settings import get_settings


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    serve_metrics(settings.metrics_port)
    app = create_app(settings)
    # log_config=None: uvicorn's records go through our (JSON) handler instead of its own format.
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_config=None, proxy_headers=True)


if __name__ == "__main__":
    main()
