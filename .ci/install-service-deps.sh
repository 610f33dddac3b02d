#!/usr/bin/env bash
# Installs what the generation service and its tests need from Debian's packages:
# redis-server (BullMQ's queue store; `npm run serve` starts one when REDIS_URL is unset) and
# chromium (the web page's browser tests drive the system browser with playwright-core).
# Idempotent. Needs root (or both already installed).
set -euo pipefail
# --redis-only: what `./setup.sh` asks for (users need the queue store, not the test browser)
need=()
command -v redis-server >/dev/null || need+=(redis-server)
if [ "${1:-}" != --redis-only ]; then command -v chromium >/dev/null || need+=(chromium); fi
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install-service-deps: ${need[*]} missing; run as root or: apt-get install ${need[*]}" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# the package's own service is not used: the project starts its own redis-server per need
systemctl disable --now redis-server >/dev/null 2>&1 || true
