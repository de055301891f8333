"""No call waits for numba (backends/numba_warmup.py): under `auto`, a call whose kernels are
not compiled runs torch's kernel while they compile in the background, then numba takes over,
with the same results and the same running statistics.

Run in a fresh process on an empty numba cache, as a user's first training steps are."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("numba")

_FIRST_STEPS = textwrap.dedent(
    """
    import threading
    import torch, batchnorm as bn
    from batchnorm import backends
    from batchnorm.backends import numba_kernels, numba_warmup

    # Hold the helper until the first calls are done (they run before any kernel is ready
    # whatever the machine's speed); then see that this process compiled nothing itself.
    gate = threading.Event()
    run = numba_warmup._HELPER.run
    numba_warmup._HELPER.run = lambda request: (gate.wait(), run(request))
    torch.manual_seed(0)
    x = torch.randn(64, 16, 16, 16)
    ours, theirs = bn.BatchNormAct(bn.BatchNorm2d(16), "relu"), torch.nn.BatchNorm2d(16)
    before = backends.resolve("auto", x, "relu", False).backend.name
    ys = [ours(x.requires_grad_()) for _ in range(3)]  # first calls: nothing compiled yet
    ys[0].sum().backward()
    gate.set()
    numba_warmup.wait()
    # the running update's rule: loaded from the disk cache (a hit), not compiled here (a miss)
    rule = numba_kernels.fold_running.stats
    compiled_here = f"{sum(rule.cache_misses.values())}/{sum(rule.cache_hits.values())}"
    after = backends.resolve("auto", x, "relu", False).backend.name
    y_numba = ours(x)
    y_numba.sum().backward()
    for _ in range(4):
        y_torch = torch.relu(theirs(x))
    print(before, after, ours.bn.num_batches_tracked.item(),
          float((ys[0] - y_torch).abs().max()), float((y_numba - y_torch).abs().max()),
          float((ours.bn.running_var - theirs.running_var).abs().max()),
          numba_warmup._HELPER._process is not None, compiled_here)
    """
)


@pytest.mark.slow
def test_first_calls_run_torchs_kernel_until_numba_has_compiled(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), BATCHNORM_COMPILE="background")
    done = subprocess.run([sys.executable, "-c", _FIRST_STEPS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after, count, first_error, numba_error, running_error, helper, compiled_here = done.stdout.split()
    # compiled by the helper process, the kernels and the running update's rule alike (numba's
    # compiler in this process would hold the interpreter lock from the calls)
    assert (before, after) == ("aten", "numba") and helper == "True" and compiled_here == "0/1"
    assert int(count) == 4  # every call folded in once, on either side of the swap
    assert float(first_error) < 1e-5 and float(numba_error) < 1e-5 and float(running_error) < 1e-6


_RAN: list[int] = []


def _record(value: int) -> None:
    """A request's function: what a compile would be, as something the test can see."""
    _RAN.append(value)


def test_blocking_mode_compiles_at_the_first_call(monkeypatch):
    from batchnorm.backends import numba_warmup

    monkeypatch.setenv(numba_warmup.ENV_VAR, "blocking")
    monkeypatch.setattr(numba_warmup, "_ready", set())
    _RAN.clear()
    request = numba_warmup.Request(__name__, "_record", (1,))
    assert numba_warmup.ready(request) and _RAN == [1]
    assert numba_warmup.ready(request) and _RAN == [1]  # once per request
    assert numba_warmup.ready(request._replace(args=(2,))) and _RAN == [1, 2]


def test_a_bad_mode_is_named(monkeypatch):
    from batchnorm.backends import numba_warmup

    monkeypatch.setenv(numba_warmup.ENV_VAR, "eager")
    with pytest.raises(ValueError, match="BATCHNORM_COMPILE must be"):
        numba_warmup.ready(numba_warmup.Request(__name__, "_record", (3,)))


@pytest.mark.slow
def test_the_helper_process_runs_each_request_and_reports_failures():
    """A request names a function by module and name; a failure is reported back (the thread
    then compiles in this process) and the helper goes on serving."""
    from batchnorm.backends import numba_warmup

    helper = numba_warmup._Helper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "ok": nothing to say
            helper.run(numba_warmup.Request("math", "sqrt", (4.0,)))
        with pytest.warns(RuntimeWarning, match="compile helper failed.*TypeError"):
            helper.run(numba_warmup.Request("math", "sqrt", ("four",)))
        helper.run(numba_warmup.Request("math", "sqrt", (9.0,)))
        assert helper._process.poll() is None  # still serving
    finally:
        helper._process.stdin.close()
        helper._process.wait(timeout=60)
    assert helper._process.returncode == 0


_COMPILED_FIRST_STEPS = textwrap.dedent(
    """
    import threading
    import torch, batchnorm as bn
    from torch._dynamo.utils import counters
    from batchnorm.backends import numba_warmup
    from batchnorm.backends.aten import NativeStandIn
    from batchnorm.backends.numba_cpu import NumbaBackend

    # Hold the helper until the first steps are done, so that they run before any kernel
    # is ready whatever the machine's speed; count which backend's whole op each call runs.
    gate, ran = threading.Event(), []
    run = numba_warmup._HELPER.run
    numba_warmup._HELPER.run = lambda request: (gate.wait(), run(request))
    for cls in (NativeStandIn, NumbaBackend):
        for name in ("forward", "backward"):
            def counted(self, *args, _inner=getattr(cls, name), _tag=cls.__name__ + "." + name):
                ran.append(_tag)
                return _inner(self, *args)
            setattr(cls, name, counted)

    torch.manual_seed(0)
    x = torch.randn(64, 16, 16, 16)
    ours, theirs = bn.BatchNormAct(bn.BatchNorm2d(16), "relu"), torch.nn.BatchNorm2d(16)
    step = torch.compile(ours, fullgraph=True)
    y_first = step(x.requires_grad_())
    y_first.sum().backward()
    first = sorted(set(ran))
    frames = counters["frames"]["ok"]
    gate.set()
    numba_warmup.wait()
    ran.clear()
    y_numba = step(x)
    y_numba.sum().backward()
    for _ in range(2):
        y_torch = torch.relu(theirs(x))
    print(",".join(first), ",".join(sorted(set(ran))), counters["frames"]["ok"] - frames,
          ours.bn.num_batches_tracked.item(), float((y_first - y_torch).abs().max()),
          float((y_numba - y_torch).abs().max()), float((ours.bn.running_var - theirs.running_var).abs().max()))
    """
)


@pytest.mark.slow
def test_a_compiled_graph_runs_torchs_kernels_until_numba_has_compiled():
    """torch.compile puts our op in the graph; until its kernels are compiled (in the helper
    process) the op runs torch's kernels (aten.NativeStandIn), then numba's, with no recompile.
    The helper is held until the first step is done, so numba's shared on-disk cache serves
    (the suite's precompile fills it): an empty one would add a compile, not a check."""
    env = dict(os.environ, BATCHNORM_COMPILE="background")
    done = subprocess.run(
        [sys.executable, "-c", _COMPILED_FIRST_STEPS], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, then, recompiled, count, first_error, numba_error, running_error = done.stdout.split()
    assert first == "NativeStandIn.backward,NativeStandIn.forward"
    assert then == "NumbaBackend.backward,NumbaBackend.forward"
    assert int(recompiled) == 0 and int(count) == 2
    assert float(first_error) < 1e-5 and float(numba_error) < 1e-5 and float(running_error) < 1e-6


@pytest.mark.parametrize("size", [(2, 16, 4, 4), (64, 16, 16, 16), "dynamic batch"])
def test_building_a_graph_with_our_op_starts_its_kernels_compiling(monkeypatch, size):
    """The op's fake implementation, which runs while a graph holding it is compiled, asks for
    the kernels of the call's case, so that they compile while Inductor compiles the graph
    (both thread counts for a symbolic size, without a guard on it); in the blocking mode
    the op compiles them at its first run instead."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from batchnorm.backends import numba_kernels, numba_warmup

    def asked_in(mode):
        asked = []
        monkeypatch.setenv(numba_warmup.ENV_VAR, mode)
        monkeypatch.setattr(numba_warmup, "ready", asked.append)
        fake = FakeTensorMode(shape_env=ShapeEnv())
        real = torch.empty((64, 16, 16, 16) if size == "dynamic batch" else size).to(memory_format=torch.channels_last)
        dims = [DimDynamic.DYNAMIC if size == "dynamic batch" else DimDynamic.STATIC] + [DimDynamic.STATIC] * 3
        x = fake.from_tensor(real, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
        with fake:
            torch.ops.batchnorm.batch_norm(x, None, None, x, None, None, 1e-5, "relu6", True, "numba")
        assert not fake.shape_env.guards
        return asked

    assert asked_in("blocking") == []
    asked = asked_in("background")
    numel = torch.Size(size).numel() if size != "dynamic batch" else None
    threads = [False, True] if numel is None else [numba_kernels.threads(numel, torch.get_num_threads()) > 1]
    assert [request.args.threads for request in asked] == threads
    for request in asked:
        assert request.function == "compile_case" and request.module == "batchnorm.backends.numba_cpu"
        assert request.args == ("float32", 2, request.args.threads, True, "clamp")


# A compilation still running in the background when the process forks (a DataLoader worker
# forked during the first steps); the child then asks for the same kernels.
_FORK_DURING_A_COMPILE = textwrap.dedent(
    """
    import os, time
    os.environ["BATCHNORM_COMPILE"] = "background"
    from batchnorm.backends import numba_warmup

    request = numba_warmup.Request("time", "sleep", (1.0,))  # a compilation that takes a second
    assert not numba_warmup.ready(request)
    pid = os.fork()
    if pid == 0:
        deadline = time.monotonic() + 60
        while not numba_warmup.ready(request) and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0 if numba_warmup.ready(request) else 1)
    _, status = os.waitpid(pid, 0)
    numba_warmup.wait()
    print(numba_warmup.ready(request), os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.slow
def test_a_child_forked_during_a_compile_compiles_what_it_asks_for():
    """The parent's compiling thread is not in the child: the child's request starts its own
    compilation there (it was left waiting for the parent's for good) and becomes ready."""
    done = subprocess.run([sys.executable, "-c", _FORK_DURING_A_COMPILE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "0"], done.stdout + done.stderr[-3000:]
