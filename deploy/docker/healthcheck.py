#!/usr/bin/env python3
"""The container health check of every EchoX image (`echox-healthcheck` in the images).

One image runs every role, so the check asks what this container serves:

    echox-healthcheck http      GET http://127.0.0.1:$ECHOX_HTTP_PORT/healthz       (api)
    echox-healthcheck grpc      grpc.health.v1 Check on 127.0.0.1:$ECHOX_GRPC_PORT  (gateway)
    echox-healthcheck metrics   GET http://127.0.0.1:$ECHOX_METRICS_PORT/metrics    (stage workers)
    echox-healthcheck url URL   GET URL answers 200                                  (Triton: /v2/health/ready)
    echox-healthcheck none      always healthy (a role with nothing to ask, e.g. a one-off command)

Without an argument the mode comes from ECHOX_HEALTHCHECK (default `metrics`). Exit 0 when
healthy, 1 with a one-line reason on stderr otherwise. Only the standard library is needed,
except for `grpc` (grpcio and grpcio-health-checking, in the runtime image), so the Triton
image's system Python runs it too.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = float(os.environ.get("ECHOX_HEALTHCHECK_TIMEOUT_S", "3"))
MODES = ("http", "grpc", "metrics", "url", "none")


def check_url(url: str) -> str | None:
    """None when `url` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} did not answer: {getattr(exc, 'reason', exc)}"
    return None if status == 200 else f"{url} answered {status}"


def check_grpc(address: str, service: str = "") -> str | None:
    """None when the grpc.health.v1 service at `address` says SERVING, else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return f"gRPC health at {address}: {exc.code().name}"  # type: ignore[attr-defined]
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"gRPC health at {address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def port(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise SystemExit(f"echox-healthcheck: {name} is not set")
    return value


def check(mode: str, args: list[str]) -> str | None:
    if mode == "http":
        return check_url(f"http://127.0.0.1:{port('ECHOX_HTTP_PORT', '8080')}/healthz")
    if mode == "grpc":
        return check_grpc(f"127.0.0.1:{port('ECHOX_GRPC_PORT', '50051')}")
    if mode == "metrics":
        return check_url(f"http://127.0.0.1:{port('ECHOX_METRICS_PORT')}/metrics")
    if mode == "url":
        if not args:
            raise SystemExit("echox-healthcheck: `url` needs the URL to ask")
        return check_url(args[0])
    if mode == "none":
        return None
    raise SystemExit(f"echox-healthcheck: unknown mode {mode!r} (one of {', '.join(MODES)})")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    mode = args.pop(0) if args else os.environ.get("ECHOX_HEALTHCHECK", "metrics")
    problem = check(mode, args)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
