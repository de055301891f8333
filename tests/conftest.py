"""Test-wide settings: hypothesis profiles ("ci" is what `make test` runs under CI)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# `auto` runs torch's kernel while numba compiles a case in the background (numba_warmup.py);
# the suite compiles at first use instead, so that which backend runs a call does not depend
# on a race. tests/backends/test_numba_warmup.py tests the background mode.
os.environ.setdefault("BATCHNORM_COMPILE", "blocking")

# Without a GPU, the triton backend's kernels run in Triton's CPU interpreter. Triton reads
# TRITON_INTERPRET as it is imported (its own tl.* helpers are decorated then), so the
# variable is set here, before any test module can import triton.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
