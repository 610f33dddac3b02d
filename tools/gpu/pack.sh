#!/usr/bin/env bash
# Prepares, on this machine, what tools/gpu/run.sh needs on the GPU machine, which has no Node and no
# network (docs/gpu-run.md): .gpu/ (git-ignored) with Node, dawn.node and the engine checks bundled
# by esbuild (tools/gpu/checks.ts), and .gl/ (git-ignored) with the Vulkan loader's .deb, as the
# device tool's README says. Then one device call runs it:
#   run(command: "bash tools/gpu/run.sh", carry: [".gl", ".gpu"], timeout_s: 540)
# Both folders stay well under the 64 MiB a call carries (about 30 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu
mkdir -p .gpu/node_modules/webgpu/dist/linux-x64 .gl
# Node 20 and dawn.node, compressed (unpacked by run.sh)
xz -T0 -c "$(readlink -f "$(command -v node)")" > .gpu/node.xz
xz -T0 -c node_modules/webgpu/dist/linux-x64/dawn.node > .gpu/dawn.node.xz
cp node_modules/webgpu/index.js node_modules/webgpu/package.json .gpu/node_modules/webgpu/
# the engine checks, one ES module (webgpu stays external: it loads dawn.node beside it)
B="import{createRequire as __cr}from'module';const require=__cr(import.meta.url);"
npx esbuild tools/gpu/checks.ts --bundle --platform=node --format=esm --external:webgpu --outfile=.gpu/checks.mjs --banner:js="$B" --log-level=warning
# the Vulkan loader (the device machine has the NVIDIA driver but may lack libvulkan1)
if [ -z "$(ls .gl/*.deb 2>/dev/null)" ]; then
  mkdir -p /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  apt-get $o update -qq
  (cd .gl && apt-get $o download -qq libvulkan1)
fi
du -sh .gpu .gl
echo "packed: now run(command: \"bash tools/gpu/run.sh\", carry: [\".gl\", \".gpu\"], timeout_s: 540)"
