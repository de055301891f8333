"""Every experiment, in a tiny configuration, writes a well-formed record and its plots; the
helpers the verdicts rest on compute what they say."""

import json

import numpy as np
import pytest
import torch

from batchnorm import data as datasets
from batchnorm import experiments
from batchnorm.experiments import batch_size, common, covariate_shift, distributions, noise, speed, test_time

# Per experiment, the smallest settings that still exercise every arm and every verdict.
TINY = {
    "speed": dict(steps=30, eval_every=10),
    "distributions": dict(steps=20, every=5),
    "learning-rate": dict(steps=10, lrs=[0.1, 100.0]),
    "noise": dict(steps=20, eval_every=10),
    "batch-size": dict(steps=4, batch_sizes=[2, 8, 32]),
    "test-time": dict(steps=20, momenta=[0.1, 0.5], lengths=[0.5, 1.0], test_batch_sizes=[1, 2, 16]),
    "covariate-shift": dict(steps=20),
    "input-normalization": dict(steps=20, eval_every=10),
}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    done = {}
    for name in experiments.EXPERIMENTS:
        config = experiments.config_for(name, quick=True, seeds=[0], **TINY[name])
        ticks = {"total": None, "done": 0}

        def progress(advance=0, *, total=None, ticks=ticks):
            if total is not None:
                ticks["total"] = total
            ticks["done"] += advance

        done[name] = (experiments.run_into(name, config, out, progress), config, ticks)
    return out, done


def test_every_experiment_is_tested():
    assert set(TINY) == set(experiments.EXPERIMENTS)


@pytest.mark.parametrize("name", list(TINY))
def test_record_is_well_formed(records, name):
    out, done = records
    record, config, ticks = done[name]
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved == json.loads(json.dumps(record))  # what was returned is what was saved
    assert saved["experiment"] == name and saved["config"] == config
    assert saved["claim"] == experiments.get(name).CLAIM and "{" not in saved["setup"]
    assert isinstance(saved["held"], bool) and saved["checks"]
    assert saved["held"] == all(c["held"] for c in saved["checks"])
    for check in saved["checks"]:
        assert check["criterion"] and isinstance(check["held"], bool) and check["numbers"]
    assert isinstance(saved["result"], str) and saved["result"]
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["batchnorm"] and env["python"] and env["machine"]
    assert ticks["total"] is not None and ticks["done"] == ticks["total"]  # the progress bar ends full
    assert saved["plots"]
    for plot in saved["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_speed_numbers(records):
    numbers = records[1]["speed"][0]["numbers"]
    for runs in numbers["curves"].values():
        assert runs[0]["steps"] == [0, 10, 20, 30]
        assert all(0 <= a <= 1 for a in runs[0]["test_acc"])
    assert 0 < numbers["target"] <= 1


def test_learning_rate_detects_divergence(records):
    sweep = records[1]["learning-rate"][0]["numbers"]["sweep"]
    assert [p["lr"] for p in sweep["no batch norm"]] == [0.1, 100.0]
    assert sweep["no batch norm"][1]["diverged"] == 1  # lr 100 without batch norm blows up


def test_test_time_batch_size_one_is_undefined(records):
    numbers = records[1]["test-time"][0]["numbers"]
    assert numbers["per_batch"]["1"] is None
    assert 0 <= numbers["per_batch"]["2"]["mean"] <= 1
    assert {(row["momentum"], row["steps"]) for row in numbers["table"]} == {(m, n) for m in (0.1, 0.5) for n in (10, 20)}


def test_covariate_shift_restores_source_statistics(records):
    table = records[1]["covariate-shift"][0]["numbers"]["test_acc"]
    assert table["adapted"]["clean"] == table["source"]["clean"]
    assert set(table["source"]) == {"clean", "contrast", "brightness", "noise"}


def test_batch_size_arms(records):
    table = records[1]["batch-size"][0]["numbers"]["table"]
    labels = [row["label"] for row in table]
    assert "ghost batch norm @ 32" in labels and "batch renorm @ 2" in labels
    steps = {row["batch_size"]: row["steps"] for row in table}
    assert steps == {2: 64, 8: 16, 32: 4}  # equal examples: 4 steps at the reference batch of 32


def test_resume_lookup(records):
    out, done = records
    record, config, _ = done["noise"]
    assert experiments.finished(out, "noise", config)["result"] == record["result"]
    assert experiments.finished(out, "noise", {**config, "steps": 21}) is None
    assert [r["experiment"] for r in experiments.load_results(out)] == list(experiments.EXPERIMENTS)


def test_config_for_rejects_unknown():
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.get("speeed")
    with pytest.raises(ValueError, match="no setting 'lr_max'"):
        experiments.config_for("speed", lr_max=3)
    with pytest.raises(ValueError, match="at least one seed"):
        experiments.config_for("speed", seeds=[])
    assert experiments.config_for("speed", steps=None)["steps"] == speed.FULL["steps"]


def test_threads_are_restored():
    before = torch.get_num_threads()
    with experiments.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ---- helpers -----------------------------------------------------------------------------


def test_batch_indices_cover_each_epoch_once():
    batches = common.batch_indices(10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(batches) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # 3 full batches, the incomplete 4th dropped
    with pytest.raises(ValueError, match="between 2 and"):
        next(common.batch_indices(10, 1, torch.Generator()))


def test_train_stops_on_divergence():
    ds = common.Data(datasets.standardize(datasets.load("digits")))
    model = common.seeded_model(0, lambda: common.mlp(64, 10, width=8, depth=1, activation="relu", batchnorm=False), "cpu")
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    result = common.train(model, ds, steps=5, batch_size=16, lr=0.1, seed=0, eval_every=2)
    assert result["diverged"] and result["final_loss"] is None
    json.dumps(result, allow_nan=False)  # a diverged run still saves as strict JSON
    assert result["test_acc"][1:] == [0.1, 0.1]


def test_steps_to_target_and_median():
    assert common.steps_to_target([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == 10
    assert common.steps_to_target([0, 10], [0.1, 0.2], 0.5) is None
    assert speed._median_steps([10, None, 30]) == 30
    assert speed._median_steps([10, None, None]) is None
    assert speed._median_steps([10, 20]) == 15


def test_instability_zero_for_constant_and_grows_with_drift():
    steady = np.tile([[-1.0, 0.0, 1.0]], (50, 2, 1))
    assert distributions.instability_of(steady) == 0
    drifting = steady + np.linspace(0, 4, 50)[:, None, None]
    assert distributions.instability_of(drifting) > 0.5


def test_moving_noise_train_vs_eval():
    layer = noise.MovingNoise((0.5, 1.5), 1.0, 0.5)
    x = torch.randn(64, 5)
    assert torch.equal(layer.eval()(x), x)
    y1, y2 = layer.train()(x), layer(x)
    assert not torch.allclose(y1, y2)  # a new distribution at every call


def test_shifts():
    x = np.array([[0.0, 2.0], [4.0, 6.0]])
    np.testing.assert_allclose(covariate_shift.shifted(x, "contrast", 0.5, 3.0, 2.0, 0), [[1.5, 2.5], [3.5, 4.5]])
    np.testing.assert_allclose(covariate_shift.shifted(x, "brightness", 0.5, 3.0, 2.0, 0), x + 1.0)
    assert np.abs(covariate_shift.shifted(x, "noise", 0.5, 3.0, 2.0, 0) - x).max() > 0
    with pytest.raises(ValueError, match="unknown shift"):
        covariate_shift.shifted(x, "blur", 1.0, 0.0, 1.0, 0)


def test_batch_size_schedule():
    config = batch_size.FULL
    assert batch_size.schedule(2, config) == (config["steps"] * 16, config["lr"] / 16)
    assert batch_size.schedule(64, config) == (config["steps"] // 2, config["lr"] * 2)


def test_per_batch_accuracy_leaves_running_stats():
    ds = common.Data(datasets.load("teacher"))
    model = common.seeded_model(0, lambda: common.mlp(32, 10, width=8, depth=1, activation="relu", batchnorm=True), "cpu")
    before = model[1].running_mean.clone()
    assert test_time.per_batch_accuracy(model, ds, 1, 0) is None
    acc = test_time.per_batch_accuracy(model, ds, 50, 0)
    assert 0 <= acc <= 1 and torch.equal(model[1].running_mean, before) and not model.training
