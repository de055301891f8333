#!/usr/bin/env bash
# The triton backend measured on a CUDA machine, in one call of under ~9 minutes (H200,
# torch 2.11, triton 3.6, Python 3.12; nothing installed), from the repository root:
#
#   0. the machine: GPU, SMs, driver, CUDA, torch, triton  -> docs/bench/gpu-machine.json
#   1. every kernel specialization the benchmark launches, compiled in parallel with this
#      machine's Triton (registers, spills, occupancy; it also fills Triton's cache, so the
#      steps below do not compile one kernel at a time)  -> docs/bench/triton-compile-cuda.txt/.json
#   2. `batchnorm bench kernels --device cuda --backend triton` in fp32 and bf16: triton
#      against torch eager on every row (what the rule reads, so it runs first)
#      -> docs/bench/kernels-cuda-triton.json, docs/benchmarks-cuda.md
#   3. the full-size tests (ResNet-50 rows at batch 256 and MLP rows, both views, bf16 and
#      fp32, contract and whole op, against the float64 reference)
#      -> docs/bench/triton-tests-cuda.txt (and .xml)
#   3b. the traceable ops (tests/test_triton_ops.py): opcheck, compiled with Inductor, with
#      CUDA graphs and with dynamic shapes against eager over training steps
#      -> docs/bench/triton-ops-cuda.txt (and .xml)
#   4. `batchnorm bench train --device cuda`, when that command exists
#      -> docs/bench/train-cuda.txt
#   5. head to head on a few rows: the tiles and single-read sizes in use against the
#      earlier, lower-occupancy ones -> docs/bench/triton-designs-cuda.txt
#   5b. the default CUDA path (backend "aten") against torch.nn.BatchNorm2d: times, and
#      whether both launch the same kernels (cuDNN)  -> docs/bench/aten-vs-torch-cuda.txt
#   6. the dispatch rule regenerated from the recorded runs -> src/batchnorm/backends/gpu_rule.json
#
# Each step has a time cap inside one overall deadline (GPU_CHECK_SECONDS, default 540), and a
# step that fails or runs out of time does not stop the others. With $OUT set, everything also
# goes to $OUT/gpu-check.tgz (repository-relative paths: `tar xzf` at the repository root puts
# the files in place) and the console to $OUT/gpu-check.log. Exit status: nonzero when a step
# failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
PY="${PYTHON:-python3}"
# The last 30 s of the deadline are kept for the rule and the copies to $OUT.
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-540} - 30 ))
mkdir -p docs/bench
LOG=docs/bench/gpu-check.log
: > "$LOG"
FAILED=()

# step NAME CAP COMMAND...: run with at most CAP seconds, and never past the deadline.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    (( left < cap )) && cap=$left
    if (( cap < 10 )); then
        echo "== $name: skipped, no time left" | tee -a "$LOG"
        FAILED+=("$name (no time)")
        return
    fi
    echo "== $name (at most ${cap}s): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
    (( rc != 0 )) && FAILED+=("$name (exit $rc)")
}

step machine 60 "$PY" -c '
import json, torch
from batchnorm_lab.timing import gpu_info
info = gpu_info()
info["torch"] = torch.__version__
json.dump(info, open("docs/bench/gpu-machine.json", "w"), indent=1)
print(info)'

ARCH=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)' 2>/dev/null)
if [[ "$ARCH" == 80 || "$ARCH" == 90 ]]; then
    step compile 120 "$PY" -m batchnorm_lab.triton_compile --arch "$ARCH" --jobs "$(nproc)" \
        --json docs/bench/triton-compile-cuda.json
    grep -v -i warn "$LOG" | sed -n '/^| arch/,/specializations compiled/p' > docs/bench/triton-compile-cuda.txt
else
    echo "== compile: sm_$ARCH is not one triton_compile knows (80, 90): skipped" | tee -a "$LOG"
fi

step bench 240 "$PY" -m batchnorm_lab.cli bench kernels --device cuda --backend triton --dtype float32 \
    --dtype bfloat16 --no-compile --out docs/bench --markdown docs/benchmarks-cuda.md

step tests 180 "$PY" -m pytest tests/backends/test_triton_gpu.py -k full_size -q -p no:cacheprovider \
    --junitxml=docs/bench/triton-tests-cuda.xml
grep -v -i warn "$LOG" | sed -n '/^== tests (/,/^== tests:/p' > docs/bench/triton-tests-cuda.txt

step ops 150 "$PY" -m pytest tests/test_triton_ops.py -q -p no:cacheprovider --junitxml=docs/bench/triton-ops-cuda.xml
grep -v -i warn "$LOG" | sed -n '/^== ops (/,/^== ops:/p' > docs/bench/triton-ops-cuda.txt

if "$PY" -m batchnorm_lab.cli bench train --help > /dev/null 2>&1; then
    step train 90 bash -c "$PY -m batchnorm_lab.cli bench train --device cuda --out docs/bench \
        --markdown docs/bench-train-cuda.md 2>&1 | tee docs/bench/train-cuda.txt"
else
    echo "== train: no 'bench train' command yet: skipped" | tee -a "$LOG"
fi

# The designs head to head, forward + backward with add + ReLU
# (triton_gpu.forward / backward): the tiles in use (TILE_ELEMENTS 2048, 512 on unaligned
# rows) against 4096 everywhere (what the kernels had before, 150-255 registers), and the
# single-read path against the tiled one on the rows where either can run, with the earlier
# 16384-value single-read block (32 values per thread, 12-25% occupancy) where it applies.
step designs 90 "$PY" - <<'PY'
import torch, triton.testing
from batchnorm.backends import triton_gpu as tg

ROWS = [(256, 64, 12544), (256, 1024, 196), (256, 2048, 49), (128, 512, 49), (256 * 49, 2048), (4096, 1024), (256, 512)]
out = open("docs/bench/triton-designs-cuda.txt", "w")

def say(line):
    print(line)
    out.write(line + "\n")

def timed(x, dy, res, w, b, rm, rv, tiling, single_read):
    def step():
        f = tg.forward(x, w, b, rm, rv, 1e-5, "relu", res, tiling=tiling, single_read=single_read)
        tg.backward(dy, x, *f.vectors, "relu", res, weight_dtype=w.dtype, bias_dtype=b.dtype, tiling=tiling,
                    single_read=single_read)
    return triton.testing.do_bench(step, warmup=5, rep=40) * 1e3

say(f"forward + backward, add + ReLU; microseconds (do_bench medians); {torch.cuda.get_device_name()}")
for shape in ROWS:
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        dy, res = torch.randn_like(x), torch.randn_like(x)
        c = shape[1]
        w, b = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        g = tg.geometry(x)
        programs = tg.PROGRAMS_PER_SM * tg._sms(x)
        now = tg.tiling_for(g, programs)
        saved = tg.TILE_ELEMENTS, tg.UNALIGNED_TILE_ELEMENTS
        tg.TILE_ELEMENTS = tg.UNALIGNED_TILE_ELEMENTS = 4096
        before = tg.tiling_for(g, programs)
        tg.TILE_ELEMENTS, tg.UNALIGNED_TILE_ELEMENTS = saved
        args = (x, dy, res, w, b, rm, rv)
        t = {f"tiled {now.block_c}x{now.block_l}": timed(*args, now, 0)}
        if before != now:
            t[f"tiled {before.block_c}x{before.block_l} (4096)"] = timed(*args, before, 0)
        if tg.single_read_block(g, None, tg._sms(x)) is not None:
            t["single-read (8192)"] = timed(*args, None, None)
        if tg.single_read_block(g, 16384, tg._sms(x)) is not None:
            t["single-read (16384)"] = timed(*args, None, 16384)
        say(f"{shape} {str(dtype)[6:]}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
PY

# The default CUDA path (aten) must run torch's own kernels (cuDNN where it applies): our layer
# with backend="aten" against torch.nn.BatchNorm2d, forward + backward, and the kernels each
# launches, by name (torch.profiler), so that a difference shows which kernel differs.
step aten 40 "$PY" - <<'PY'
import torch, triton.testing
import batchnorm as bn

out = open("docs/bench/aten-vs-torch-cuda.txt", "w")
for shape, dtype in [((64, 256, 56, 56), torch.float32), ((64, 256, 56, 56), torch.bfloat16), ((256, 2048, 7, 7), torch.bfloat16)]:
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    times, kernels = {}, {}
    for name, layer in (("torch", torch.nn.BatchNorm2d(shape[1])), ("ours aten", bn.BatchNorm2d(shape[1], backend="aten"))):
        layer = layer.cuda().to(dtype)
        step = lambda: layer(x).backward(torch.ones_like(x))
        times[name] = triton.testing.do_bench(step, warmup=5, rep=40) * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels[name] = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    line = f"{shape} {str(dtype)[6:]}: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items())
    line += f"; same kernels: {kernels['torch'] == kernels['ours aten']}"
    print(line)
    out.write(line + "\n" + "\n".join(f"  {k}: {v}" for k, v in kernels.items()) + "\n")
PY

DEADLINE=$(( DEADLINE + 30 ))
step rule 25 "$PY" -m batchnorm_lab.cli bench gpu-rule --runs "docs/bench/kernels-cuda*.json" \
    --out src/batchnorm/backends/gpu_rule.json

echo "failed steps: ${FAILED[*]:-none}" | tee -a "$LOG"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp "$LOG" "$OUT/gpu-check.log"
    tar czf "$OUT/gpu-check.tgz" --ignore-failed-read docs/bench/gpu-machine.json docs/bench/triton-compile-cuda.json \
        docs/bench/triton-compile-cuda.txt docs/bench/triton-tests-cuda.txt docs/bench/triton-tests-cuda.xml \
        docs/bench/triton-ops-cuda.txt docs/bench/triton-ops-cuda.xml docs/bench/aten-vs-torch-cuda.txt \
        docs/bench/kernels-cuda-triton.json docs/benchmarks-cuda.md docs/bench/train-cuda.txt \
        docs/bench/triton-designs-cuda.txt docs/bench/gpu-check.log src/batchnorm/backends/gpu_rule.json 2>/dev/null
    echo "wrote $OUT/gpu-check.tgz and $OUT/gpu-check.log"
fi
[[ ${#FAILED[@]} -eq 0 ]]
