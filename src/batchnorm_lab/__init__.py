"""The lab around the `batchnorm` library: experiments, benchmarks, datasets, the report and
the command line (`batchnorm ...`).

It imports the library (`import batchnorm`) and never the other way round: the library
runs without the lab and without its dependencies (the `experiments` extra: scikit-learn,
mnist1d, matplotlib, jinja2, rich, typer). Its layers, each importing only those below:

- the command line: `cli.py` (and `__main__.py`), `experiment_commands.py`;
- what the commands run: `experiments/`, `report.py`, `bench.py`, `bench_train.py`,
  `triton_compile.py`, `train.py`;
- what those share: `data.py` (datasets), `models.py` (networks), `bench_grid.py` and
  `timing.py` (the benchmark's rows and how one is timed), `files.py` (atomic writes).
"""
