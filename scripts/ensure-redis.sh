#!/usr/bin/env bash
# Makes sure a Redis answers on 127.0.0.1:6379 (installing and starting one if needed).
set -euo pipefail
ping() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
ping && exit 0
if ! command -v redis-server >/dev/null; then
  bash "$(dirname "$0")/install-apt.sh" redis-server
fi
echo "starting redis-server on 127.0.0.1:6379"
redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis did not start on 127.0.0.1:6379" >&2
exit 1
