#!/usr/bin/env bash
# The GPU half of issue 4, on a machine with CUDA, from any directory:
#   1. the triton backend's tests on the GPU, full-size ResNet-50 / MLP rows included
#      -> docs/bench/triton-tests-cuda.txt (and .xml)
#   2. `batchnorm bench kernels --device cuda` (auto vs torch eager vs torch.compile, bandwidth
#      against a copy measured in the same run)
#      -> docs/bench/kernels-cuda.json and docs/benchmarks-cuda.md
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

echo "triton tests: exit $tests; bench: exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
