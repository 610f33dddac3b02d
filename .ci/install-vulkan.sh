#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver (lavapipe) from bookworm-backports: Debian bookworm's own
# Mesa 22 is too old for Dawn; Mesa 25 from backports works (shader-f16, subgroups, timestamps).
# Idempotent. Needs root. On non-bookworm Debian/Ubuntu it installs the distribution's Mesa.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "install-vulkan: run as root" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/debian.sources
codename=$(. /etc/os-release; echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ]; then
  if [ -f "$src" ]; then
    if ! grep -q 'bookworm-backports' "$src"; then
      # add backports to the Suites: line of the entry that carries "bookworm" (same archive)
      sed -i -E '0,/^Suites: bookworm( |$)/s//Suites: bookworm bookworm-backports\1/' "$src"
    fi
  else
    grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ || \
      echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/backports.list
  fi
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
else
  apt-get update -qq
  apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
dpkg -s mesa-vulkan-drivers | grep -E '^Version' || true
