"""Every experiment, in a tiny configuration, writes a well-formed record and its plots; the
helpers the verdicts rest on compute what they say."""

import json

import numpy as np
import pytest
import torch

from batchnorm import BatchNormAct
from batchnorm_lab import data as datasets
from batchnorm_lab import experiments
from batchnorm_lab.experiments import (
    batch_size,
    common,
    convnets,
    covariate_shift,
    distributions,
    learning_rate,
    noise,
    small_batch_norms,
    speed,
    test_time,
)

# Per experiment, the smallest settings that still exercise every arm and every verdict.
TINY = {
    "speed": dict(steps=30, eval_every=10),
    "distributions": dict(steps=20, every=5),
    "learning-rate": dict(steps=10, lrs=[0.1, 100.0]),
    "noise": dict(steps=20, eval_every=10),
    "batch-size": dict(steps=4, batch_sizes=[2, 8, 32], cnn_batch_sizes=[4, 16], cnn_steps=4, cnn_channels=4),
    "test-time": dict(steps=20, momenta=[0.1, 0.5], lengths=[0.5, 1.0], test_batch_sizes=[1, 2, 16]),
    "covariate-shift": dict(steps=20),
    "input-normalization": dict(steps=20, eval_every=10, lrs=[0.01, 1.0]),
    # teacher: 1-D inputs of 32 features, generated in milliseconds (MNIST-1D takes seconds)
    "cnn-speed": dict(dataset="teacher", steps=20, eval_every=10, unpowered=[], inits=["practitioner", "torch"]),
    "cnn-learning-rate": dict(steps=30, lrs=[0.1, 100.0], channels=4, blocks=1),
    "cnn-depth": dict(steps=6, depths=[2, 5], lrs=[0.01, 0.1], channels=4),
    "bn-position": dict(steps=10, eval_every=5, depth=2, channels=4),
    "small-batch-norms": dict(steps=2, batch_sizes=[2, 8], channels=4, norms=list(small_batch_norms.NORMS)),
    # the fast path needs 2^18 elements per layer: the full width and batch, few steps
    "cnn-wallclock": dict(steps=4, eval_every=2, layer_repeats=2),
}


# Runs every experiment (about 20 s of one core): the tests that read it are marked slow.
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
@pytest.mark.slow
def test_record_is_well_formed(records, name):
    out, done = records
    record, config, ticks = done[name]
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved == json.loads(json.dumps(record))  # what was returned is what was saved
    assert saved["experiment"] == name and saved["config"] == config
    assert saved["claim"] == experiments.get(name).CLAIM and "{" not in saved["setup"]
    assert isinstance(saved["held"], bool) and saved["checks"]
    rejudged = [{k: v for k, v in c.items() if k != "status"} for c in saved["checks"]]
    assert saved["verdict"] == common.judge(rejudged, config) and rejudged == saved["checks"]
    assert saved["held"] == (saved["verdict"] == common.HELD)
    assert isinstance(saved["headline"], str) and 0 < len(saved["headline"]) <= 40  # fits the demo's table
    for check in saved["checks"]:
        assert check["criterion"] and isinstance(check["held"], bool) and check["numbers"]
        assert isinstance(check["why"], str) and check["why"]
    assert isinstance(saved["result"], str) and saved["result"]
    # what people read carries no raw Python value
    for text in (saved["result"], saved["headline"], *(c["why"] for c in saved["checks"])):
        assert "None" not in text and "nan" not in text, text
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["batchnorm"] and env["python"] and env["machine"]
    assert ticks["total"] is not None and ticks["done"] == ticks["total"]  # the progress bar ends full
    assert saved["plots"]
    for plot in saved["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind


@pytest.mark.slow
def test_speed_numbers(records):
    numbers = records[1]["speed"][0]["numbers"]
    for runs in numbers["curves"].values():
        assert runs[0]["steps"] == [0, 10, 20, 30]
        assert all(0 <= a <= 1 for a in runs[0]["test_acc"])
    assert 0 < numbers["target"] <= 1


@pytest.mark.slow
def test_learning_rate_detects_divergence(records):
    sweep = records[1]["learning-rate"][0]["numbers"]["sweep"]
    assert [p["lr"] for p in sweep["no batch norm"]] == [0.1, 100.0]
    assert sweep["no batch norm"][1]["diverged"] == 1  # lr 100 without batch norm blows up


@pytest.mark.slow
def test_test_time_batch_size_one_is_undefined(records):
    numbers = records[1]["test-time"][0]["numbers"]
    assert numbers["per_batch"]["1"] is None
    assert 0 <= numbers["per_batch"]["2"]["mean"] <= 1
    assert {(row["momentum"], row["steps"]) for row in numbers["table"]} == {(m, n) for m in (0.1, 0.5) for n in (10, 20)}


@pytest.mark.slow
def test_covariate_shift_restores_source_statistics(records):
    table = records[1]["covariate-shift"][0]["numbers"]["test_acc"]
    assert table["adapted"]["clean"] == table["source"]["clean"]
    assert set(table["source"]) == {"clean", "contrast", "brightness", "noise"}


@pytest.mark.slow
def test_batch_size_arms(records):
    table = records[1]["batch-size"][0]["numbers"]["table"]
    labels = [row["label"] for row in table]
    assert "ghost batch norm @ 32" in labels and "batch renorm @ 2" in labels
    steps = {row["batch_size"]: row["steps"] for row in table}
    assert steps == {2: 64, 8: 16, 32: 4}  # equal examples: 4 steps at the reference batch of 32


@pytest.mark.slow
def test_input_normalization_picks_each_arms_rate_on_validation(records):
    numbers = records[1]["input-normalization"][0]["numbers"]
    for arm, points in numbers["sweep"].items():
        assert [p["lr"] for p in points] == [0.01, 1.0]
        best = max(points, key=lambda p: p["validation"]["mean"])
        assert numbers["best_lr"][arm] == best["lr"]  # chosen on validation, not on test
        assert numbers["mean_test_accuracy_at_best_lr"][arm] == best["test"]["mean"]
    assert set(numbers["best_lr_at_edge"]) == set(numbers["best_lr"])  # a two-point sweep has only edges


@pytest.mark.slow
def test_cnn_speed_judges_the_yardstick_and_reruns_the_other_init(records):
    record = records[1]["cnn-speed"][0]
    yardstick = next(c for c in record["checks"] if c["name"] == "reaches the published CNN accuracy")
    final = record["numbers"]["final_test_acc"]["batch norm"]["mean"]
    assert yardstick["held"] == (final >= 0.94) and record["numbers"]["published"]["CNN"] == 0.94
    other = record["other_inits"]["torch"]  # rerun with torch's init for the network without batch norm
    assert {c["name"] for c in other["checks"]} == {c["name"] for c in record["checks"]}
    # the batch-norm arm does not depend on the baseline's init: the same numbers in both runs
    assert other["numbers"]["curves"]["batch norm"] == record["numbers"]["curves"]["batch norm"]
    assert other["numbers"]["curves"]["no batch norm"] != record["numbers"]["curves"]["no batch norm"]


@pytest.mark.slow
def test_cnn_learning_rate_sweep(records):
    numbers = records[1]["cnn-learning-rate"][0]["numbers"]
    for arm, points in numbers["sweep"].items():
        assert [p["lr"] for p in points] == [0.1, 100.0]
        assert points[1]["diverged"] == 1 or points[1]["test_acc"]["mean"] <= 0.15  # lr 100 wrecks both networks
        trains = [p["lr"] for p in points if not p["diverged"] and p["test_acc"]["mean"] >= numbers["bar"]]
        assert numbers["largest_rate_that_trains"][arm] == max(trains, default=None)


@pytest.mark.slow
def test_cnn_depth_takes_each_networks_best_rate(records):
    table = records[1]["cnn-depth"][0]["numbers"]["table"]
    for rows in table.values():
        assert [r["depth"] for r in rows] == [2, 5]
        for row in rows:
            best = max(row["sweep"], key=lambda p: p["train_acc"]["mean"])
            assert row["best_lr"] == best["lr"] and row["train_acc"] == best["train_acc"]


@pytest.mark.slow
def test_cnn_wallclock_runs_our_kernels_on_the_same_math(records):
    numbers = records[1]["cnn-wallclock"][0]["numbers"]
    assert len(numbers["backends"]) == 5  # the stem and two per block
    for layer in numbers["backends"].values():
        assert layer["numel"] >= 2**18 and layer["backend"] == "numba"
    ours, theirs = numbers["runs"]["ours"][0], numbers["runs"]["torch"][0]
    assert ours["same_initial_tensors"] and abs(ours["first_loss"] - theirs["first_loss"]) <= 1e-4 * theirs["first_loss"]
    assert len(ours["step_ms"]) == 4 and ours["steps"] == [0, 2, 4]
    assert ours["seconds"] == sorted(ours["seconds"]) and ours["seconds"][-1] > 0
    assert set(numbers["batchnorm_part"]["per_step_ms"]) == {"ours", "torch"}


@pytest.mark.slow
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
    assert common.median_steps([10, None, 30]) == 30
    assert common.median_steps([10, None, None]) is None
    assert common.median_steps([10, 20]) == 15


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
    before = model[1].bn.running_mean.clone()
    assert test_time.per_batch_accuracy(model, ds, 1, 0) is None
    acc = test_time.per_batch_accuracy(model, ds, 50, 0)
    assert 0 <= acc <= 1 and torch.equal(model[1].bn.running_mean, before) and not model.training


def test_practitioner_init():
    torch.manual_seed(0)
    relu = common.mlp(400, 10, width=400, depth=2, activation="relu", batchnorm=False, init="practitioner")
    assert abs(relu[0].weight.std().item() - (2 / 400) ** 0.5) < 0.002  # He: variance 2 / fan_in
    assert relu[0].bias.abs().max() == 0
    sigmoid = common.mlp(400, 10, width=400, depth=2, activation="sigmoid", batchnorm=False, init="practitioner")
    assert abs(sigmoid[2].weight.std().item() - (2 / 800) ** 0.5) < 0.002  # Xavier: 2 / (fan_in + fan_out)
    torch.manual_seed(0)
    default = common.mlp(400, 10, width=400, depth=2, activation="relu", batchnorm=False)
    assert abs(default[0].weight.std().item() - (1 / 1200) ** 0.5) < 0.002  # torch's: 1 / (3 fan_in)
    assert relu[-1].weight.std().item() < 0.05  # the classifier keeps torch's default
    with pytest.raises(ValueError, match="unknown initialization"):
        common.initialize(relu, "relu", "lecun")
    assert common.init_for({"inits": ["practitioner"]}, batchnorm=True) == "torch"
    assert common.init_for({"inits": ["torch", "practitioner"]}, batchnorm=False) == "torch"


def test_holdout_and_global_standardization():
    ds = datasets.load("digits")
    scaled = datasets.standardize_global(ds)
    assert abs(scaled.x_train.mean()) < 1e-4 and abs(scaled.x_train.std() - 1) < 1e-4
    expected = (ds.x_train - ds.x_train.mean()) / ds.x_train.std()  # one mean and one scale for every pixel
    np.testing.assert_allclose(scaled.x_train, expected, atol=1e-5)
    data = common.Data(scaled)
    split = data.holdout(0.2)
    assert len(split.x) + len(split.x_test) == len(data.x) and len(split.x_test) == round(0.2 * len(data.x))
    # a partition of the training split (every row once), the test split left as it was
    torch.testing.assert_close(torch.cat([split.x, split.x_test]).sum(0), data.x.sum(0))
    assert torch.equal(split.y.bincount(minlength=10) + split.y_test.bincount(minlength=10), data.y.bincount(minlength=10))
    assert data.x_test.shape == (450, 64)


def test_trainers_with_one_seed_see_the_same_batches():
    data = common.Data(datasets.standardize(datasets.load("teacher")))
    build = lambda: common.mlp(32, 10, width=8, depth=1, activation="relu", batchnorm=False)  # noqa: E731
    a = common.Trainer(common.seeded_model(0, build, "cpu"), data, batch_size=16, lr=0.1, seed=3)
    b = common.Trainer(common.seeded_model(0, build, "cpu"), data, batch_size=16, lr=0.1, seed=3)
    for _ in range(5):
        assert a.step() and b.step()
    assert a.losses == b.losses


def test_accumulating_progress_sums_the_runs_totals():
    seen = []
    progress = experiments.accumulating(lambda advance=0, *, total=None: seen.append((advance, total)))
    progress(total=3)
    progress(2)
    progress(total=5)
    assert seen == [(0, 3), (2, None), (0, 8)]


def test_convnets_shapes_and_fusion():
    x = torch.randn(4, 64)
    torch.manual_seed(0)
    theirs = convnets.resnet((8, 8), 10, channels=4, blocks=2, batchnorm=True, layer="torch")
    torch.manual_seed(0)
    ours = convnets.resnet((8, 8), 10, channels=4, blocks=2, batchnorm=True, layer="ours")
    layers = convnets.batchnorm_layers(ours)
    fused = [m for m in ours.modules() if isinstance(m, BatchNormAct)]
    assert len(layers) == 5 and [m.bn for m in fused] == layers  # ReLUs fused
    assert all(type(m.act) is torch.nn.ReLU for m in fused)
    calls = {n.target: n for n in ours.graph.nodes if n.op == "call_module"}
    assert all(len(calls[f"{b}.bn2"].args) == 2 for b in (4, 5))  # bn2(x, shortcut): the residual add fused
    torch.testing.assert_close(ours(x), theirs(x))
    assert convnets.cnn1d((40,), 10, channels=25, batchnorm=False)[-1].in_features == 125  # the authors' CNN
    assert convnets.cnn1d((40,), 10, channels=25, batchnorm=True)(torch.randn(3, 40)).shape == (3, 10)
    plain = convnets.plain_cnn((8, 8), 10, channels=4, depth=7, batchnorm=False)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in plain.modules()) == 7 and plain(x).shape == (4, 10)


def test_reusing_training_gives_what_training_gives():
    data = common.Data(datasets.standardize(datasets.load("teacher")))
    build = lambda: common.mlp(32, 10, width=8, depth=1, activation="relu", batchnorm=True)  # noqa: E731
    settings = dict(steps=12, batch_size=16, lr=0.1, seed=1, eval_every=4)
    trained = common.seeded_model(0, build, "cpu")
    expected = common.train(trained, data, **settings)
    ticks = []
    with common.reusing_training():
        first = common.train(common.seeded_model(0, build, "cpu"), data, **settings)
        again = common.seeded_model(0, build, "cpu")
        reused = common.train(again, data, **settings, progress=lambda n=0, **_: ticks.append(n))
        other = common.train(common.seeded_model(1, build, "cpu"), data, **settings)  # other initial tensors
    assert first == expected == reused and other != expected
    assert sum(ticks) == 12  # the progress bar still advances by the steps
    for name, tensor in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor)  # the model ends where training leaves it
    assert common._reused is None  # nothing is kept after the block


def test_cnn_wallclock_warm_up_compiles_on_copies_and_leaves_the_models_alone():
    from batchnorm_lab.experiments import cnn_wallclock, common, convnets

    data = common.load_data({**cnn_wallclock.QUICK, "dataset": "digits", "device": "cpu"}, per_feature=False)
    models = {arm: convnets.resnet(data.sample_shape, data.n_classes, channels=4, blocks=1, batchnorm=True, layer=arm)
              for arm in cnn_wallclock.ARMS}  # fmt: skip
    before = {arm: {k: v.clone() for k, v in m.state_dict().items()} for arm, m in models.items()}
    cnn_wallclock.warm_up(models, data, batch_size=8)
    for arm, model in models.items():
        assert all(torch.equal(v, before[arm][k]) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())


def test_judge_marks_the_checks_a_config_cannot_power_inconclusive():
    def checks():
        return [common.record_verdict("a", "a holds", True, why="1 vs 0"),
                common.record_verdict("b", "b holds", False, why="0 vs 1")]

    judged = checks()
    assert common.judge(judged, {}) == common.NOT_HELD
    assert [c["status"] for c in judged] == [common.HELD, common.NOT_HELD]
    judged = checks()
    assert common.judge(judged, {"unpowered": ["b"]}) == common.INCONCLUSIVE
    assert [c["status"] for c in judged] == [common.HELD, common.INCONCLUSIVE]
    assert common.judge(checks(), {"unpowered": ["a"]}) == common.NOT_HELD  # a powered check failed
    assert common.judge(checks()[:1], {}) == common.HELD
    with pytest.raises(ValueError, match="'c'"):
        common.judge(checks(), {"unpowered": ["c"]})  # a name that is no check


@pytest.mark.slow
def test_every_quick_unpowered_check_exists(records):
    for name, (record, _, _) in records[1].items():
        unpowered = experiments.config_for(name, quick=True).get("unpowered", [])
        assert set(unpowered) <= {c["name"] for c in record["checks"]}, name


def test_a_sweep_where_no_rate_trains_says_none_in_words():
    points = {"batch norm": [{"lr": 0.1, "test_acc": {"mean": 0.9}, "diverged": 0}],
              "no batch norm": [{"lr": 0.1, "test_acc": {"mean": 0.1}, "diverged": 1}]}
    outcome = learning_rate.compare(points, 0.9)
    assert outcome["headline"] == "lr 0.1 vs none" and "none without" in outcome["result"]
    assert outcome["checks"][0]["why"] == "lr 0.1 with BN vs none without"


def test_regularization_effect_and_its_slope_over_the_sizes_where_both_trained():
    def row(arm, b, gap, diverged=0, train=1.0):
        return {"arm": arm, "batch_size": b, "gap": {"mean": gap}, "diverged": diverged, "train_acc": {"mean": train}}

    rows = [row("batch norm", 4, 0.01), row("no batch norm", 4, 0.05),  # effect 0.04
            row("batch norm", 16, 0.02), row("no batch norm", 16, 0.04),  # 0.02
            row("batch norm", 64, 0.03), row("no batch norm", 64, 0.03),  # 0.0
            row("batch norm", 256, 0.03), row("no batch norm", 256, 0.0, diverged=1),  # left out: diverged
            row("batch norm", 1024, 0.03), row("no batch norm", 1024, 0.0, train=0.1)]  # left out: at chance
    effect = batch_size.regularization(rows)
    assert effect["batch_sizes"] == [4, 16, 64]
    assert np.allclose(effect["effect"], [0.04, 0.02, 0.0])
    assert effect["slope"] == pytest.approx(-0.01)  # -0.02 per two doublings
    assert batch_size.regularization(rows[:2])["slope"] is None  # one size: no slope


@pytest.mark.slow
def test_batch_size_judges_the_direction_on_the_mlp_and_the_cnn(records):
    record = records[1]["batch-size"][0]
    names = [c["name"] for c in record["checks"]]
    assert "regularization shrinks (MLP)" in names and "regularization shrinks (CNN)" in names
    cnn = record["numbers"]["cnn_table"]
    assert {(r["arm"], r["batch_size"], r["steps"]) for r in cnn} == {
        (arm, b, steps) for arm in batch_size.KINDS for b, steps in ((4, 32), (16, 8))}  # equal examples
    assert "batch-size-regularization.png" in record["plots"]


def test_normed_cnn_puts_each_normalization_before_or_after_the_relu():
    from batchnorm.nn import BatchNorm2d

    x = torch.randn(4, 64)
    before = convnets.normed_cnn((8, 8), 10, channels=4, depth=2, norm="batch", position="before")
    after = convnets.normed_cnn((8, 8), 10, channels=4, depth=2, norm="batch", position="after")
    assert before[1].bias is None and isinstance(before[2], BatchNormAct) and isinstance(before[2].bn, BatchNorm2d)
    assert type(before[2].act) is torch.nn.ReLU
    assert after[1].bias is not None and isinstance(after[2], torch.nn.ReLU)
    assert type(after[3]) is BatchNorm2d and isinstance(after[4], torch.nn.Conv2d)  # no activation fused after it
    group = convnets.normed_cnn((8, 8), 10, channels=4, depth=2, norm="group", groups=2)
    layer = convnets.normed_cnn((8, 8), 10, channels=4, depth=2, norm="layer")
    assert group[2][0].num_groups == 2 and layer[2][0].num_groups == 1 and isinstance(layer[2][1], torch.nn.ReLU)
    for model in (before, after, group, layer):
        assert model(x).shape == (4, 10)
    with pytest.raises(ValueError, match="position"):
        convnets.normed_cnn((8, 8), 10, channels=4, depth=2, norm="batch", position="between")


@pytest.mark.slow
def test_bn_position_trains_both_placements_on_the_same_seeds(records):
    numbers = records[1]["bn-position"][0]["numbers"]
    assert set(numbers["curves"]) == {"before", "after"}
    for runs in numbers["curves"].values():
        assert runs[0]["steps"] == [0, 5, 10]
    assert all(numbers["step_ms"][arm]["mean"] > 0 for arm in ("before", "after"))


@pytest.mark.slow
def test_small_batch_norms_trains_every_norm_at_every_size(records):
    numbers = records[1]["small-batch-norms"][0]["numbers"]
    assert set(numbers["table"]) == set(small_batch_norms.NORMS)
    for rows in numbers["table"].values():
        assert [(r["batch_size"], r["steps"]) for r in rows] == [(2, 32), (8, 8)]  # equal examples


def test_small_batch_norms_checks_on_hand_made_accuracies():
    def rows(acc):
        return [{"batch_size": b, "test_acc": {"mean": a}} for b, a in acc.items()]

    config = {"batch_sizes": [2, 32], "tolerance": 0.02}
    held = small_batch_norms.judge({"group norm": rows({2: 0.95, 32: 0.96}), "batch norm": rows({2: 0.80, 32: 0.97})},
                                   config)
    assert [c["held"] for c in held] == [True, True, True]
    failed = small_batch_norms.judge({"group norm": rows({2: 0.90, 32: 0.96}), "batch norm": rows({2: 0.96, 32: 0.97})},
                                     config)
    assert [c["held"] for c in failed] == [False, False, False]
    assert failed[0]["why"] == "spread 6.0 pts"


@pytest.mark.slow
def test_every_check_that_fails_says_why_on_one_line_at_80_columns(records):
    """The demo prints one line per failed check: experiment, check and its numbers."""
    from batchnorm_lab.experiment_commands import why_lines

    for name, (record, _, _) in records[1].items():
        failed = {**record, "verdict": common.NOT_HELD,
                  "checks": [{**c, "status": common.NOT_HELD} for c in record["checks"]]}
        lines = why_lines([failed])
        assert len(lines) == len(record["checks"])
        for check, line in zip(record["checks"], lines):
            assert line == f"{name} - {check['name']}: {check['why']}" and len(line) <= 80, line
        inconclusive = why_lines([{**record, "verdict": common.INCONCLUSIVE}])
        assert inconclusive == [f"{name} inconclusive, run fully: batchnorm run {name}"]
        assert len(inconclusive[0]) <= 80
