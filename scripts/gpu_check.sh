#!/usr/bin/env bash
# The GPU half of issue 4, on a machine with CUDA, from any directory:
#   1. the triton backend's tests on the GPU, full-size ResNet-50 / MLP rows included
#      -> docs/bench/triton-tests-cuda.txt (and .xml)
#   2. `batchnorm bench kernels --device cuda` (auto vs torch eager vs torch.compile, bandwidth
#      against a copy measured in the same run)
#      -> docs/bench/kernels-cuda.json and docs/benchmarks-cuda.md
#   3. the whole op's single-read path against its tiled path, and the kernels' registers
#      -> docs/bench/triton-paths-cuda.txt
# The benchmark runs even when a test fails (the numbers are still worth having); the script
# then exits with the tests' status. Needs torch with CUDA, triton, pytest and hypothesis.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
PY="${PYTHON:-python}"
mkdir -p docs/bench

"$PY" - > docs/bench/gpu-machine.txt <<'EOF'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")
EOF
cat docs/bench/gpu-machine.txt

"$PY" -m pytest tests/backends/test_triton_gpu.py -q -p no:cacheprovider \
    --junitxml=docs/bench/triton-tests-cuda.xml 2>&1 | tee docs/bench/triton-tests-cuda.txt
tests=${PIPESTATUS[0]}

"$PY" -m batchnorm.cli bench kernels --device cuda --out docs/bench --markdown docs/benchmarks-cuda.md
bench=$?

# Whole training steps (`batchnorm bench train --device cuda`): ResNet-20 fp32 and ResNet-50 bf16
# (batch 128, channels_last), torch vs ours, eager and torch.compile; an arm that fails is
# recorded in the table, so a nonzero exit here means the benchmark itself broke.
#   -> docs/bench/train-cuda.json and docs/bench-train-cuda.md
"$PY" -m batchnorm.cli bench train --device cuda --out docs/bench --markdown docs/bench-train-cuda.md
echo "bench train: exit $?"

# 3. The whole op's two paths head to head (docs/gpu-notes.md, designs 6 and 7): forward +
#    backward (add + ReLU) of triton_gpu.forward/backward on the path the size rule picks
#    against the tiled path forced (single_read=0), and the registers / spills of every
#    compiled whole-op kernel.  -> docs/bench/triton-paths-cuda.txt
"$PY" - 2>&1 <<'PY' | tee docs/bench/triton-paths-cuda.txt
import torch, triton.testing
from batchnorm.backends import triton_gpu as tg

class Recorder:  # keeps the compiled kernel each launch returns
    def __init__(self, kernels):
        self.kernels, self.compiled = kernels, {}
    def __getattr__(self, name):
        kernel, compiled = getattr(self.kernels, name), self.compiled
        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    compiled[name] = kernel[grid](*args, **kwargs)
                return run
        return Launch()

rec = Recorder(tg._kernels())
tg._kernels = lambda: rec
for shape in [(256, 2048, 49), (256, 4096), (256, 512), (64, 100), (256, 1024, 196)]:
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        dy, res = torch.randn_like(x), torch.randn_like(x)
        c = shape[1]
        w, b = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        def step(limit):
            f = tg.forward(x, w, b, rm, rv, 1e-5, "relu", res, factor=0.1, single_read=limit)
            tg.backward(dy, x, *f.vectors, "relu", res, weight_dtype=w.dtype, bias_dtype=b.dtype, single_read=limit)
        block = tg.single_read_block(tg.geometry(x), None, tg._sms(x))
        us = {name: triton.testing.do_bench(lambda: step(limit)) * 1e3 for name, limit in (("rule", None), ("tiled", 0))}
        gb = x.numel() * x.element_size() * (8 if block else 12) / 1e9  # add + ReLU design traffic
        print(f"{shape} {dtype}: single-read block_c {block}; fwd+bwd rule {us['rule']:.1f} us, "
              f"tiled {us['tiled']:.1f} us; rule at {gb / us['rule'] * 1e6:.0f} GB/s of design traffic")
        for name, k in sorted(rec.compiled.items()):
            print(f"    {name}: {getattr(k, 'n_regs', '?')} registers, {getattr(k, 'n_spills', '?')} spills")
        rec.compiled.clear()
PY
paths=${PIPESTATUS[0]}

echo "triton tests: exit $tests; bench: exit $bench; paths: exit $paths"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$paths" -eq 0 ]
