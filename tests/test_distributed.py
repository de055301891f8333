"""SyncBatchNorm over torch.distributed (gloo on CPU) against single-process batch norm.

Starting processes is the expensive part on two cores, so the whole file spawns ONE group
of 4 processes, with subgroups of the first 2 and 3 ranks: every world size (2, 3, 4) runs
its list of tasks in one phase, the other ranks waiting at a barrier. The tests then check
the results against torch's batch norm in float64 on the concatenated batch, computed here
in the parent. Each collective has a timeout (`GLOO_TIMEOUT_S`; `FAIL_TIMEOUT_S` in the
failure task) and the whole group a deadline (`DEADLINE_S`), after which its processes are
terminated: nothing hangs.
"""

from __future__ import annotations

import copy
import datetime
import random
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import activations
from batchnorm.distributed import SyncBatchNorm, no_buffer_broadcast

from tools.processes import free_port, spawn_and_wait

WORLD = 4
GLOO_TIMEOUT_S = 60  # generous: the machine is shared, and idle ranks wait at a barrier
FAIL_TIMEOUT_S = 5
DEADLINE_S = 150
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
OURS = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
}


# --- running the group of processes ---------------------------------------------------------


def _entry(rank: int, port: int, plan: list, outdir: str) -> None:
    """One spawned process: join the group, run each phase it belongs to, save the results.

    plan: [(size, [(task, arg), ...]), ...]; a phase of size k runs on ranks 0..k-1 over a
    subgroup of k (the default group for k = WORLD, so that process_group=None is covered).
    """
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=GLOO_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timeout)
    groups = {k: dist.new_group(list(range(k)), timeout=timeout) for k, _ in plan if k < WORLD}
    results = {}
    for size, tasks in plan:
        if rank < size:
            results[size] = [TASKS[name](rank, size, groups.get(size), arg) for name, arg in tasks]
        dist.barrier()
    torch.save(results, Path(outdir) / f"rank{rank}.pt")
    dist.barrier()  # leave together (train._group says why)
    dist.destroy_process_group()


def run_plan(plan: list, outdir: Path) -> dict[int, list[list]]:
    """Spawn the group and run `plan`; results[size][task][rank]. Terminated at the deadline."""
    spawn_and_wait(_entry, (free_port(), plan, str(outdir)), WORLD, DEADLINE_S)
    per_rank = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {
        size: [list(task) for task in zip(*(per_rank[r][size] for r in range(size)))]
        for size, _ in plan
    }


def part(t: torch.Tensor | None, splits: list[int], rank: int) -> torch.Tensor | None:
    """This rank's slice of a global batch, keeping channels-last memory when the batch has it."""
    if t is None:
        return None
    lo = sum(splits[:rank])
    piece = t[lo : lo + splits[rank]]
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return piece.contiguous(memory_format=torch.channels_last)
    return piece.clone()


# --- equivalence cases: drawn here, run in every rank, checked in the parent ----------------


def draw_splits(rng: random.Random, n: int, world: int, kind: str) -> list[int]:
    """Split n examples over the ranks: evenly, unevenly, with one empty rank, or all on one."""
    if kind == "even":
        return [n // world + (r < n % world) for r in range(world)]
    if kind == "all_on_one":
        splits = [0] * world
        splits[rng.randrange(world)] = n
        return splits
    cuts = sorted(rng.randint(0, n) for _ in range(world - 1))
    splits = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    if kind == "empty" and 0 not in splits:
        r = rng.randrange(world)
        splits[(r + 1) % world] += splits[r]
        splits[r] = 0
    return splits


def draw_case(rng: random.Random, world: int, kind: str, offset: bool) -> dict:
    ndim = rng.choice([2, 3, 4, 5])
    c = rng.choice([1, 3, 8])
    n = rng.randint(2, 3 * world)
    shape = (n, c, *[rng.randint(1, 3) for _ in range(ndim - 2)])
    # A large mean next to a small spread (offset): a sum of squares without a good shift
    # loses the variance in fp32.
    dtype = torch.float32 if offset else rng.choice([torch.float32, torch.float64, torch.bfloat16])
    offset = 1e3 if offset else 0.0
    g = torch.Generator().manual_seed(rng.randrange(2**31))

    def batch():
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1 + offset).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if ndim == 4 and rng.random() < 0.5 else x

    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    residual = rng.random() < 0.3
    return dict(
        kind=kind, shape=shape, dtype=dtype, param_dtype=param_dtype, offset=offset,
        splits=[draw_splits(rng, n, world, kind) for _ in range(2)],
        xs=[batch() for _ in range(3)],  # two training steps, then evaluation
        dys=[torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)],
        residuals=[torch.randn(shape, generator=g).to(dtype) if residual else None for _ in range(3)],
        weight=torch.rand(c, generator=g, dtype=param_dtype) + 0.5,
        bias=torch.randn(c, generator=g, dtype=param_dtype),
        momentum=rng.choice([0.1, None]),
        affine=rng.random() < 0.8,
        track=rng.random() < 0.8,
        activation=rng.choice([None, "relu", "tanh"]),
    )


def draw_cases(world: int, seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    kinds = ["even", "uneven", "empty", "all_on_one"]
    return [draw_case(rng, world, kinds[i % len(kinds)], offset=i % 3 == 1) for i in range(count)]


def _make_sync(case: dict, **kwargs) -> SyncBatchNorm:
    m = SyncBatchNorm(
        case["shape"][1], momentum=case["momentum"], affine=case["affine"],
        track_running_stats=case["track"], dtype=case["param_dtype"],
        **kwargs,
    )
    if case["affine"]:
        with torch.no_grad():
            m.weight.copy_(case["weight"])
            m.bias.copy_(case["bias"])
    return m


def task_equivalence(rank: int, world: int, group, case: dict) -> dict:
    """Two training steps and an evaluation of SyncBatchNorm on this rank's slices."""
    m = _make_sync(case, process_group=group)
    steps = []
    for step in range(2):
        splits = case["splits"][step]
        x = part(case["xs"][step], splits, rank).requires_grad_()
        y = m(x, part(case["residuals"][step], splits, rank), activation=case["activation"])
        y.backward(part(case["dys"][step], splits, rank))
        steps.append(dict(
            y=y.detach(), dx=x.grad,
            dweight=None if m.weight is None else m.weight.grad.clone(),
            dbias=None if m.bias is None else m.bias.grad.clone(),
            buffers={k: v.clone() for k, v in m.named_buffers()},
        ))
        m.zero_grad()
    m.eval()
    with torch.no_grad():
        y_eval = m(
            part(case["xs"][2], case["splits"][0], rank), part(case["residuals"][2], case["splits"][0], rank),
            activation=case["activation"],
        )
    return dict(steps=steps, y_eval=y_eval)


def expected_equivalence(case: dict) -> dict:
    """torch's batch norm in float64 on the concatenated batches."""
    ndim = len(case["shape"])
    m = TORCH_BN[ndim](
        case["shape"][1], momentum=case["momentum"], affine=case["affine"],
        track_running_stats=case["track"], dtype=torch.float64,
    )
    if case["affine"]:
        with torch.no_grad():
            m.weight.copy_(case["weight"])
            m.bias.copy_(case["bias"])

    def run(i):
        x = case["xs"][i].double().requires_grad_()
        z = m(x)
        if case["residuals"][i] is not None:
            z = z + case["residuals"][i].double()
        return x, activations.forward(z, case["activation"])

    steps = []
    for step in range(2):
        x, y = run(step)
        y.backward(case["dys"][step].double())
        steps.append(dict(
            y=y.detach(), dx=x.grad,
            dweight=None if m.weight is None else m.weight.grad.clone(),
            dbias=None if m.bias is None else m.bias.grad.clone(),
            buffers={k: v.clone() for k, v in m.named_buffers()},
        ))
        m.zero_grad()
    m.eval()
    with torch.no_grad():
        y_eval = run(2)[1]
    return dict(steps=steps, y_eval=y_eval)


def check_equivalence(case: dict, per_rank: list[dict]) -> None:
    want = expected_equivalence(case)
    # Values near 1e3 with a spread near 2 carry ~500x more fp32 rounding (in x - mu) than
    # values near 1; a sum of squares without the shift would still be off by ~1e-2.
    widen = 10.0 if case["offset"] else 1.0
    tol = {k: v * widen for k, v in TOL[case["dtype"]].items()}
    param_tol = TOL[case["param_dtype"]]
    for step in range(2):
        got = [r["steps"][step] for r in per_rank]
        exp = want["steps"][step]
        y = torch.cat([g["y"] for g in got])
        assert y.dtype == case["dtype"]
        torch.testing.assert_close(y.double(), exp["y"], **tol)
        dx = torch.cat([g["dx"] for g in got]).double()
        scale = max(1.0, float(exp["dx"].abs().max()))
        torch.testing.assert_close(dx / scale, exp["dx"] / scale, **tol)
        for name in ("dweight", "dbias"):
            if exp[name] is None:
                assert all(g[name] is None for g in got)
                continue
            total = sum(g[name].double() for g in got)  # what DDP's gradient sum sees
            scale = max(1.0, float(exp[name].abs().max()))
            torch.testing.assert_close(total / scale, exp[name] / scale, **tol)
        for name, value in exp["buffers"].items():
            mine = [g["buffers"][name] for g in got]
            assert all(torch.equal(mine[0], other) for other in mine[1:]), f"{name} differs across ranks"
            if name == "num_batches_tracked":
                assert torch.equal(mine[0], value)
            else:
                torch.testing.assert_close(mine[0].double(), value, **param_tol)
    # Evaluation reuses step 0's split: local when there are running statistics, synced when not.
    y_eval = torch.cat([r["y_eval"] for r in per_rank]).double()
    torch.testing.assert_close(y_eval, want["y_eval"], **tol)


# --- the other tasks --------------------------------------------------------------------------


def _count_collectives():
    """Patch torch.distributed: count all_reduce calls, forbid gathers and broadcasts."""
    calls = []
    real = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("SyncBatchNorm must use all_reduce only")

    dist.all_reduce = all_reduce
    dist.all_gather = dist.all_gather_into_tensor = dist.broadcast = forbidden
    return calls


def _three_layer_model(seed: int, group) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        SyncBatchNorm(4, process_group=group), torch.nn.Linear(4, 6, bias=False),
        bn.BatchNormAct(SyncBatchNorm(6, process_group=group), "relu"), torch.nn.Linear(6, 5, bias=False),
        SyncBatchNorm(5, process_group=group),
    )


def task_count_collectives(rank: int, world: int, group, _) -> dict:
    """all_reduce calls per forward and backward of a model with 3 SyncBatchNorm layers."""
    model = _three_layer_model(0, group)
    real = (dist.all_reduce, dist.all_gather, dist.all_gather_into_tensor, dist.broadcast)
    calls = _count_collectives()
    counts = []
    try:
        for step in range(3):
            x = torch.randn(3 + rank, 4, requires_grad=True)
            before = len(calls)
            y = model(x)
            forward = calls[before:]
            before = len(calls)
            y.square().sum().backward()
            counts.append(dict(forward=forward, backward=calls[before:]))
        model.eval()
        before = len(calls)
        model(torch.randn(2, 4))
        counts.append(dict(eval=calls[before:]))
    finally:
        dist.all_reduce, dist.all_gather, dist.all_gather_into_tensor, dist.broadcast = real
    return dict(counts=counts)


def task_group_of_one(rank: int, world: int, group, _) -> dict:
    """A SyncBatchNorm over a group of one process equals bn.BatchNorm1d, and syncs nothing."""
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    sync = SyncBatchNorm(3, process_group=groups[rank], momentum=None)
    local = bn.BatchNorm1d(3, momentum=None)
    real = dist.all_reduce
    calls = _count_collectives()
    try:
        out = []
        for step in range(2):
            x = torch.randn(5, 3, 2)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = sync(xa), local(xb)
            ya.sum().backward()
            yb.sum().backward()
            out.append(all(torch.equal(a, b) for a, b in [(ya, yb), (xa.grad, xb.grad), (sync.weight.grad, local.weight.grad)]))
        out.append(all(torch.equal(a, b) for a, b in zip(sync.state_dict().values(), local.state_dict().values())))
    finally:
        dist.all_reduce = real
    return dict(equal=out, calls=len(calls))


def ddp_setup():
    """The model, data and schedule of the DDP test: uneven splits and one empty rank."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8, bias=False), bn.BatchNormAct(bn.BatchNorm1d(8), "relu"),
        torch.nn.Linear(8, 8, bias=False), bn.BatchNorm1d(8), torch.nn.Linear(8, 3),
    )
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(10, 6, generator=g) * 3 + 2, torch.randint(0, 3, (10,), generator=g)) for _ in range(4)]
    return model, batches


def ddp_splits(world: int) -> list[list[int]]:
    uneven = [10 - 2 * (world - 1)] + [2] * (world - 1)
    empty = [0] + [10 // (world - 1) + (r < 10 % (world - 1)) for r in range(world - 1)]
    return [uneven, empty, uneven[::-1], empty[::-1]]


def task_ddp(rank: int, world: int, group, outdir: str) -> dict:
    """Train with DDP (no buffer broadcast) and SyncBatchNorm; rank 0 saves a checkpoint."""
    model, batches = ddp_setup()
    model = SyncBatchNorm.convert(model, process_group=group)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group, **no_buffer_broadcast())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for (x, target), splits in zip(batches, ddp_splits(world)):
        # DDP averages gradients over ranks: scale each rank's loss sum so the average is the
        # mean over the global batch, as in single-process training.
        loss = torch.nn.functional.cross_entropy(
            ddp(part(x, splits, rank)), part(target, splits, rank), reduction="sum"
        ) * world / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), Path(outdir) / f"checkpoint{world}.pt")
    return {k: v.clone() for k, v in model.state_dict().items()}


def task_one_value(rank: int, world: int, group, _) -> dict:
    """A global batch of one value per channel: every rank raises; the group stays usable."""
    m = SyncBatchNorm(4, process_group=group)
    x = torch.randn(1 if rank == 0 else 0, 4)
    try:
        m(x)
        error = None
    except ValueError as err:
        error = str(err)
    y = m(torch.randn(3, 4) * 5 + 7)  # all ranks still in step
    return dict(error=error, y=y.detach())


def task_channel_mismatch(rank: int, world: int, group, _) -> dict:
    c = 4 if rank < world - 1 else 5
    m = SyncBatchNorm(c, process_group=group)
    try:
        m(torch.randn(3, c))
        return dict(error=None)
    except ValueError as err:
        return dict(error=str(err))


def task_failure(rank: int, world: int, group, _) -> dict:
    """Rank 1 raises in step 2 before its forward and goes on (to wait at the phase barrier);
    the others must fail with our error once the collective times out, not hang."""
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=FAIL_TIMEOUT_S))
    model = _three_layer_model(1, group)
    start = None
    try:
        for step in range(2):
            if step == 1 and rank == 1:
                raise RuntimeError("simulated failure on rank 1")
            start = time.monotonic()
            model(torch.randn(4, 4)).sum().backward()
        return dict(error=None)
    except RuntimeError as err:
        return dict(error=str(err), seconds=time.monotonic() - start)


def task_compiled(rank: int, world: int, group, _) -> dict:
    """The three-layer SyncBatchNorm model under torch.compile against the same model in eager
    mode, two training steps on the same batches: each layer runs outside the graph (a
    documented graph break), so the collectives and the results are eager's."""
    compiled_model, eager_model = _three_layer_model(1, group), _three_layer_model(1, group)
    fn = torch.compile(compiled_model, backend="aot_eager")
    equal = []
    for step in range(2):
        x = torch.randn(3 + rank, 4)
        results = []
        for model in (fn, eager_model):
            xg = x.clone().requires_grad_()
            y = model(xg)
            y.square().sum().backward()
            results.append((y.detach(), xg.grad))
        equal.append(all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*results)))
    states = zip(compiled_model.state_dict().values(), eager_model.state_dict().values())
    equal.append(all(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6) for a, b in states))
    return dict(equal=equal)


TASKS = dict(
    equivalence=task_equivalence, count=task_count_collectives, group_of_one=task_group_of_one,
    ddp=task_ddp, one_value=task_one_value, mismatch=task_channel_mismatch, failure=task_failure,
    compiled=task_compiled,
)


# --- the plan ---------------------------------------------------------------------------------

N_CASES = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every world size's cases and results: {size: dict(cases, equivalence, tasks, out)}."""
    out = tmp_path_factory.mktemp("distributed")
    cases = {k: draw_cases(k, seed=k, count=N_CASES) for k in (2, 3, 4)}
    extra = {
        2: [("count", None), ("ddp", str(out)), ("one_value", None), ("compiled", None)],
        3: [("ddp", str(out)), ("one_value", None), ("mismatch", None)],
        4: [("group_of_one", None), ("one_value", None), ("failure", None)],  # failure last
    }
    plan = [(k, [("equivalence", c) for c in cases[k]] + extra[k]) for k in (2, 3, 4)]
    results = run_plan(plan, out)
    return {
        k: dict(
            cases=cases[k], equivalence=results[k][:N_CASES], out=out,
            tasks={name: results[k][N_CASES + i] for i, (name, _) in enumerate(extra[k])},
        )
        for k in (2, 3, 4)
    }


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_S + 30)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_single_process_batch_norm_on_the_concatenated_batch(runs, world):
    run = runs[world]
    for case, per_rank in zip(run["cases"], run["equivalence"]):
        check_equivalence(case, per_rank)
    assert {case["kind"] for case in run["cases"]} == {"even", "uneven", "empty", "all_on_one"}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_one_value_per_channel_raises_the_same_error_on_every_rank(runs, world):
    results = runs[world]["tasks"]["one_value"]
    for r in results:
        assert r["error"] is not None and "global batch across all processes has 1 value" in r["error"]
    # The next call, on every rank, normalizes over the global batch: the group is still in step.
    y = torch.cat([r["y"] for r in results])
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_one_all_reduce_per_layer_per_direction(runs):
    for rank_result in runs[2]["tasks"]["count"]:
        first, second, third, evaluation = rank_result["counts"]
        # First forward of each layer: the handshake (4,), the first mean (2, C), the statistics.
        assert first["forward"] == [(4,), (2, 4), (3, 4), (4,), (2, 6), (3, 6), (4,), (2, 5), (3, 5)]
        for step in (second, third):
            assert step["forward"] == [(3, 4), (3, 6), (3, 5)]
        for step in (first, second, third):
            assert step["backward"] == [(2, 5), (2, 6), (2, 4)]
        assert evaluation["eval"] == []


@pytest.mark.slow
def test_compiled_model_runs_each_layer_eagerly_with_the_same_results(runs):
    for r in runs[2]["tasks"]["compiled"]:
        assert r["equal"] == [True, True, True]


@pytest.mark.slow
def test_group_of_one_is_plain_batch_norm(runs):
    for r in runs[4]["tasks"]["group_of_one"]:
        assert r["equal"] == [True, True, True] and r["calls"] == 0


def _single_process_training():
    model, batches = ddp_setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, target in batches:
        loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_training_matches_single_process_training(runs, world):
    per_rank = runs[world]["tasks"]["ddp"]
    want = _single_process_training().state_dict()
    assert per_rank[0].keys() == want.keys()
    for key, value in want.items():
        for state in per_rank:
            assert torch.equal(state[key], per_rank[0][key]), f"{key} differs across ranks"
        torch.testing.assert_close(per_rank[0][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_from_rank_0_loads_into_a_single_process_model(runs):
    state = torch.load(runs[2]["out"] / "checkpoint2.pt", weights_only=True)
    trained = _single_process_training().eval()
    x = torch.randn(7, 6) * 3 + 2
    ours, _ = ddp_setup()  # bn.BatchNorm1d, relu fused
    ours.load_state_dict(state)
    torch.testing.assert_close(ours.eval()(x), trained(x), rtol=1e-4, atol=1e-4)
    theirs = torch.nn.Sequential(
        torch.nn.Linear(6, 8, bias=False), torch.nn.BatchNorm1d(8),
        torch.nn.Linear(8, 8, bias=False), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3),
    )
    theirs.load_state_dict(state)
    theirs.eval()
    y = theirs[4](theirs[3](theirs[2](torch.relu(theirs[1](theirs[0](x))))))
    torch.testing.assert_close(y, trained(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_channel_count_mismatch_is_reported_on_every_rank(runs):
    for r in runs[3]["tasks"]["mismatch"]:
        assert r["error"] is not None and "disagree on the number of channels" in r["error"]
        assert "from 4 to 5" in r["error"]


@pytest.mark.slow
def test_a_failing_rank_makes_the_others_fail_with_a_clear_error(runs):
    results = runs[4]["tasks"]["failure"]
    assert results[1]["error"] == "simulated failure on rank 1"
    for rank in (0, 2, 3):
        err = results[rank]["error"]
        assert err is not None and "Another process probably raised an error" in err
        assert results[rank]["seconds"] < FAIL_TIMEOUT_S + 10


# --- without processes ---------------------------------------------------------------------------


@st.composite
def local_cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = (draw(st.integers(2, 6)), draw(st.sampled_from([1, 3, 4])), *[draw(st.integers(1, 3)) for _ in range(ndim - 2)])
    return dict(
        shape=shape, momentum=draw(st.sampled_from([0.1, None])), track=draw(st.booleans()),
        activation=draw(st.sampled_from([None, "relu", "silu"])), seed=draw(st.integers(0, 2**16)),
    )


@given(case=local_cases())
def test_without_a_process_group_it_is_plain_batch_norm(case):
    assert not dist.is_initialized()
    kwargs = dict(momentum=case["momentum"], track_running_stats=case["track"])
    sync = SyncBatchNorm(case["shape"][1], **kwargs)
    local = OURS[len(case["shape"])](case["shape"][1], **kwargs)
    g = torch.Generator().manual_seed(case["seed"])
    for training in (True, True, False):
        sync.train(training)
        local.train(training)
        x = torch.randn(case["shape"], generator=g) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = sync(xa, activation=case["activation"]), local(xb, activation=case["activation"])
        assert torch.equal(ya, yb)
        ya.sum().backward()
        yb.sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        assert torch.equal(sync.weight.grad, local.weight.grad)
    for a, b in zip(sync.state_dict().values(), local.state_dict().values()):
        assert torch.equal(a, b)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = bn.BatchNormAct(bn.BatchNorm2d(4, backend="reference", momentum=None), "relu")
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5, bias=False), torch.nn.BatchNorm1d(5, affine=False))
        self.lazy = bn.LazyBatchNorm1d()

    def forward(self, x):
        return self.lazy(self.head(self.bn(self.conv(x))))


def test_convert_keeps_state_extras_and_parameters_and_revert_restores_classes():
    net = _Net()
    x = torch.randn(6, 2, 4, 4)
    net(x)  # materializes the lazy module
    params = {name: p for name, p in net.named_parameters()}
    before = copy.deepcopy(net.state_dict())
    torch_keys = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).state_dict().keys()

    synced = SyncBatchNorm.convert(net)
    assert synced is net  # converted in place, as torch does, for a container
    assert all(isinstance(m, SyncBatchNorm) for m in (net.bn.bn, net.head[2], net.lazy))
    assert isinstance(net.bn.bn, torch.nn.modules.batchnorm._BatchNorm)
    assert type(net.bn.act) is torch.nn.ReLU and net.bn.bn.backend == "reference" and net.bn.bn.momentum is None
    assert net.head[2].affine is False and not hasattr(net.head[2], "activation")
    assert net.state_dict().keys() == torch_keys
    assert all(p is params[name] for name, p in net.named_parameters())  # an optimizer keeps working
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

    reverted = SyncBatchNorm.revert(net)
    assert type(reverted.bn.bn) is bn.BatchNorm2d and type(reverted.bn.act) is torch.nn.ReLU
    assert type(reverted.head[2]) is torch.nn.BatchNorm1d and type(reverted.lazy) is bn.BatchNorm1d
    assert all(torch.equal(v, before[k]) for k, v in reverted.state_dict().items())
    assert not any(isinstance(m, SyncBatchNorm) for m in reverted.modules())


def test_convert_under_torchs_name_keeps_our_layers_where_torchs_drops_them():
    """Scripts written for torch call `SyncBatchNorm.convert_sync_batchnorm(model)`: ours takes
    that name too and keeps our layers' extras; torch's replaces our layers with its own (our
    layers are torch's _BatchNorm subclasses), dropping them: what the guide warns about."""
    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), bn.BatchNorm2d(4, renorm=bn.Renorm()))

    ours = SyncBatchNorm.convert_sync_batchnorm(net())
    assert isinstance(ours[1], SyncBatchNorm) and ours[1].renorm == bn.Renorm()
    assert type(SyncBatchNorm.convert(net())[1]) is type(ours[1])
    theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net())
    assert type(theirs[1]) is torch.nn.SyncBatchNorm and not hasattr(theirs[1], "renorm")


def test_convert_a_single_layer_and_revert_with_a_default():
    layer = bn.BatchNorm3d(3).eval()
    sync = SyncBatchNorm.convert(layer)
    assert type(sync) is SyncBatchNorm and not sync.training
    assert type(SyncBatchNorm.revert(sync)) is bn.BatchNorm3d
    fused = bn.BatchNormAct(bn.BatchNorm3d(3), "tanh").eval()
    assert SyncBatchNorm.convert(fused) is fused  # a container: its batch norm is replaced, its activation kept
    assert type(fused.bn) is SyncBatchNorm and not fused.bn.training and type(fused.act) is torch.nn.Tanh
    assert SyncBatchNorm.revert(fused) is fused and type(fused.bn) is bn.BatchNorm3d and type(fused.act) is torch.nn.Tanh
    direct = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="pass default="):
        SyncBatchNorm.revert(torch.nn.Sequential(direct))
    assert type(SyncBatchNorm.revert(direct, default=bn.BatchNorm2d)) is bn.BatchNorm2d


def test_convert_refuses_an_uninitialized_lazy_module():
    with pytest.raises(ValueError, match=r"lazy.*has not seen an input|has not seen an input"):
        SyncBatchNorm.convert(torch.nn.Sequential(torch.nn.Linear(2, 3), bn.LazyBatchNorm1d()))


def test_state_dict_is_torchs_sync_batch_norm_both_ways():
    theirs = torch.nn.SyncBatchNorm(5, momentum=None)
    with torch.no_grad():
        theirs.running_mean.uniform_()
        theirs.weight.uniform_()
    ours = SyncBatchNorm(5, momentum=None)
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.SyncBatchNorm(5)
    back.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in theirs.state_dict().items())


def test_bad_input_is_refused_before_any_collective():
    m = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected 3 channels"):
        m(torch.randn(4, 5))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(4, 3, dtype=torch.int64))


def _step_matches(model, reference, x):
    """One training step of both: same output, same buffers afterwards."""
    torch.testing.assert_close(model(x), reference(x))
    for (k, v), w in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)


def test_convert_and_revert_keep_the_extras_that_change_outputs():
    keras = bn.from_keras(3, spatial_dims=1, moving_mean=[0.5, -1.0, 2.0], moving_variance=[1.0, 4.0, 0.25])
    renorm = bn.Renorm(r_max=1.2, d_max=0.1)  # tight limits: the correction is active
    net = torch.nn.Sequential(keras, bn.BatchNormAct(bn.BatchNorm1d(3, renorm=renorm, backend="reference"), "silu"))
    reference = copy.deepcopy(net)
    g = torch.Generator().manual_seed(0)

    synced = SyncBatchNorm.convert(net)
    assert synced[0].unbiased_running_var is False
    assert synced[1].bn.renorm == renorm and type(synced[1].act) is torch.nn.SiLU and synced[1].bn.backend == "reference"
    _step_matches(synced, reference, torch.randn(8, 3, generator=g) * 3 + 1)

    reverted = SyncBatchNorm.revert(synced)
    assert type(reverted[0]) is bn.BatchNorm1d and reverted[0].unbiased_running_var is False
    assert reverted[1].bn.renorm == renorm and type(reverted[1].act) is torch.nn.SiLU and reverted[1].bn.backend == "reference"
    _step_matches(reverted, reference, torch.randn(8, 3, generator=g) * 3 + 1)


def test_convert_refuses_a_ghost_batch_layer_naming_it():
    net = torch.nn.Sequential(bn.BatchNorm1d(2), torch.nn.Linear(2, 4), bn.BatchNorm1d(4, virtual_batch_size=2))
    with pytest.raises(ValueError, match=r"BatchNorm1d at 2.*virtual_batch_size=2.*SyncBatchNorm"):
        SyncBatchNorm.convert(net)
    assert type(net[0]) is bn.BatchNorm1d and type(net[2]) is bn.BatchNorm1d  # nothing converted


def test_revert_refuses_extras_that_torchs_class_cannot_hold():
    sync = SyncBatchNorm.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    sync[0].unbiased_running_var = False
    with pytest.raises(ValueError, match=r"unbiased_running_var=False.*BatchNorm2d"):
        SyncBatchNorm.revert(sync)


def test_convert_refuses_a_layer_whose_forward_does_more_than_batch_norm():
    """timm's BatchNormAct2d is a BatchNorm2d whose forward applies an activation after it:
    replacing it by a SyncBatchNorm would silently drop that activation."""

    class NormAct(torch.nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), NormAct(4))
    with pytest.raises(ValueError, match="does more in its forward than batch norm"):
        bn.SyncBatchNorm.convert(model)
    assert type(model[1]) is NormAct  # nothing changed
