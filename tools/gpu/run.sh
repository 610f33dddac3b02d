#!/usr/bin/env bash
# The one prepared GPU run (docs/gpu-run.md), after tools/gpu/pack.sh here:
#   run(command: "bash tools/gpu/run.sh", carry: [".gl", ".gpu"], timeout_s: 540)
# On the GPU machine: the Vulkan loader from .gl/, Node and dawn.node from .gpu/, then
#   1. the engine's checks (tools/gpu/checks.ts: device and toggles, matmul, attention sdpa and
#      sage, a Wan 1.3B one-layer forward at 32,760 tokens, 2 devices on this GPU) -> $OUT/engine.jsonl
#   2. PyTorch's side (tools/gpu/torch_block.py: the same block, attention and matmul) -> $OUT/torch.jsonl
# Each part has its own timeout, so one that hangs leaves the other's results. Environment:
# TOKENS (32760), ROUNDS (3), ENGINE_TIMEOUT (330 s), TORCH_TIMEOUT (150 s), PYTHON (python3),
# SKIP_DEBS=1 (a machine whose Vulkan loader is installed: the local test of this script).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
T=${TOKENS:-32760}
R=${ROUNDS:-3}
if [ "${SKIP_DEBS:-0}" != 1 ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
mkdir -p /tmp/sd
xz -dc .gpu/node.xz > /tmp/sd/node && chmod +x /tmp/sd/node
xz -dc .gpu/dawn.node.xz > .gpu/node_modules/webgpu/dist/linux-x64/dawn.node
export XDG_RUNTIME_DIR=/tmp/sd/xdg SD_KERNELS_DIR="$PWD/kernels"
mkdir -p "$XDG_RUNTIME_DIR"
{ uname -a; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true; /tmp/sd/node --version; "${PYTHON:-python3}" -c 'import torch; print("torch", torch.__version__)' 2>&1; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"
echo "== engine (tokens $T, rounds $R)"
timeout "${ENGINE_TIMEOUT:-330}" /tmp/sd/node .gpu/checks.mjs --tokens "$T" --rounds "$R" --out "$OUT/engine.jsonl" > "$OUT/engine.log" 2>&1
echo "engine exit $?" >> "$OUT/engine.log"
grep -v '^Warning' "$OUT/engine.log" | tail -20
echo "== torch"
PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT:-150}" "${PYTHON:-python3}" tools/gpu/torch_block.py --tokens "$T" --rounds "$R" --fp32 --out "$OUT/torch.jsonl" > "$OUT/torch.log" 2>&1
echo "torch exit $?" >> "$OUT/torch.log"
tail -10 "$OUT/torch.log"
echo "== summary"
"${PYTHON:-python3}" - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys, os
out = sys.argv[1]
def rows(f):
    p = os.path.join(out, f)
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
eng, tor = rows("engine.jsonl"), rows("torch.jsonl")
tb = {r["dtype"]: r for r in tor if r["check"] == "block"}
print("| what | engine ms | engine TFLOP/s | torch bf16 ms | torch bf16 TFLOP/s | engine / torch bf16 time |")
print("|---|---|---|---|---|---|")
for r in eng:
    if r["check"] in ("block", "matmul", "attention"):
        t = next((x for x in tor if x["check"] == r["check"] and x["dtype"] == "bfloat16"), None)
        name = f'{r["check"]} {r.get("kind", "")} {r.get("act", "")}'.replace("  ", " ")
        print(f'| {name} | {r["ms"]:.1f} | {r["tflops"]:.2f} | {t["ms"]:.1f} | {t["tflops"]:.2f} | {r["ms"] / t["ms"]:.2f} |' if t else f'| {name} | {r["ms"]:.1f} | {r["tflops"]:.2f} | - | - | - |')
for r in eng:
    if r["check"] == "cp":
        print(f'\ncp over {r["devices"]} devices on this GPU: {r["ms"]:.1f} ms per forward, exchange {r["exchangeMs"]:.1f} ms, max |diff| to one device {r["maxAbsDiff"]:.2e}')
PY
