#!/usr/bin/env bash
# One-time setup on a fresh Debian/Ubuntu machine: a Vulkan driver for Dawn (Mesa lavapipe, the
# software one, from bookworm-backports on Debian 12; skipped when not root, e.g. on a machine whose
# GPU driver is already installed) and the npm dependencies (npm ci).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v node >/dev/null; then
  echo "setup: Node.js >= 20.19 is required (https://nodejs.org or apt-get install nodejs)" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash .ci/install-vulkan.sh
  bash .ci/install-service-deps.sh --redis-only   # redis-server for `npm run serve` (the job queue's store)
else
  echo "setup: not root (or no apt-get): skipping the Vulkan driver install; run .ci/install-vulkan.sh as root if 'npm run generate' reports no WebGPU adapter"
fi
npm ci --no-audit --no-fund
