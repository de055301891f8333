"""The kernel benchmark's grid (batchnorm_lab.bench_grid)."""

from batchnorm_lab import bench_grid


def test_grid_depends_on_device():
    cpu, cuda = bench_grid.grid("cpu", False), bench_grid.grid("cuda", False)
    assert len(cpu) == len(bench_grid.MLP_SHAPES) + 2 * len(bench_grid.CNN_SHAPES)
    assert set(cpu) < set(cuda) and any(s in bench_grid.RESNET50_SHAPES for s, _ in cuda)
