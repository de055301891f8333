"""Datasets: the built-in ones load with the right shapes, standardization uses the training
split only, and the file loaders (npz, IDX) reject malformed files with a clear error."""

import gzip
import struct

import numpy as np
import pytest

from batchnorm_lab import data


def test_digits_split_shapes_and_types():
    ds = data.load("digits")
    assert ds.x_train.shape == (1347, 64) and ds.x_test.shape == (450, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.n_classes == 10 and ds.sample_shape == (8, 8)
    assert ds.x_train.max() == 16.0  # raw pixel counts, not yet standardized


def test_standardize_fits_on_train_only():
    ds = data.load("digits")
    st = data.standardize(ds)
    varying = ds.x_train.std(axis=0) > 0
    np.testing.assert_allclose(st.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(st.x_train.std(axis=0)[varying], 1, rtol=1e-4)
    mean, std = ds.x_train.mean(axis=0), ds.x_train.std(axis=0)
    expected = (ds.x_test - mean) / np.where(std > 0, std, 1)
    np.testing.assert_allclose(st.x_test, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(st.x_test.mean(axis=0)[varying], 0, atol=1e-3)  # test statistics not used


def test_teacher_is_deterministic_and_learnable_shape():
    a, b = data.load("teacher"), data._teacher()
    assert a.x_train.shape == (4000, 32) and a.x_test.shape == (1000, 32)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert len(np.unique(a.y_train)) > 5


@pytest.mark.slow
def test_mnist1d_generated_offline_and_global_rng_untouched(monkeypatch):
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset downloads; make_dataset must be used")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    ds = data._mnist1d()
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.n_classes == 10
    np.testing.assert_array_equal(np.random.get_state()[1], before)


@pytest.mark.parametrize("spec", ["nope", "npz:", "idx", "digits:extra"])
def test_unknown_spec(spec):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load(spec)


def test_spec_must_be_string():
    with pytest.raises(TypeError, match="string"):
        data.load(3)


# ---- npz ---------------------------------------------------------------------------------


def _arrays(n=40, features=5):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, features)), rng.integers(0, 3, n)


def test_npz_with_and_without_test_split(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = data.load(f"npz:{tmp_path / 'a.npz'}")
    assert len(ds.y_train) == 30 and len(ds.y_test) == 10 and ds.n_features == 5
    np.savez(tmp_path / "b.npz", x=x, y=y, x_test=x[:7], y_test=y[:7])
    ds = data.load(f"npz:{tmp_path / 'b.npz'}")
    assert len(ds.y_train) == 40 and len(ds.y_test) == 7


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 2))}, "missing array"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "4 inputs but 3 labels"),
        ({"x": np.zeros((8, 2)), "y": np.zeros(8, dtype=int), "x_test": np.zeros((2, 2))}, "both x_test and y_test"),
        ({"x": np.zeros((8, 2)), "y": np.full(8, 0.5)}, "non-negative integers"),
        ({"x": np.full((8, 2), np.nan), "y": np.zeros(8, dtype=int)}, "NaN"),
        ({"x": np.zeros((8, 2)), "y": np.zeros(8, dtype=int), "x_test": np.zeros((2, 3)),
          "y_test": np.zeros(2, dtype=int)}, "test examples"),
    ],
)
def test_npz_rejects_bad_arrays(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        data.load(f"npz:{path}")


def test_npz_rejects_missing_and_garbage_files(tmp_path):
    with pytest.raises(ValueError, match="no file"):
        data.load(f"npz:{tmp_path / 'absent.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")


# ---- IDX ---------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, type_code, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(">u1").tobytes()


def _write_mnist(directory, n_train=6, n_test=4, gz=False, labels_train=None):
    rng = np.random.default_rng(1)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 3, 2)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train) if labels_train is None else labels_train,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 3, 2)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in files.items():
        content = _idx_bytes(np.asarray(array))
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / name).write_bytes(content)
    return files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loads(tmp_path, gz):
    files = _write_mnist(tmp_path, gz=gz)
    ds = data.load(f"idx:{tmp_path}")
    assert ds.x_train.shape == (6, 6) and ds.x_test.shape == (4, 6)
    assert ds.sample_shape == (3, 2)
    np.testing.assert_array_equal(ds.x_train, files["train-images-idx3-ubyte"].reshape(6, 6))
    np.testing.assert_array_equal(ds.y_test, files["t10k-labels-idx1-ubyte"])


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="wrong magic number 0x12340801"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")  # unknown type code
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        data.read_idx(path)


def test_read_idx_truncated_and_trailing(tmp_path):
    path = tmp_path / "f"
    good = _idx_bytes(np.arange(12).reshape(3, 4))
    path.write_bytes(good[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)
    path.write_bytes(good[:10])
    with pytest.raises(ValueError, match="truncated header"):
        data.read_idx(path)
    path.write_bytes(good + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        data.read_idx(path)
    path.write_bytes(good)
    np.testing.assert_array_equal(data.read_idx(path), np.arange(12).reshape(3, 4))


def test_idx_count_mismatch(tmp_path):
    _write_mnist(tmp_path, labels_train=np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="6 images but train-labels-idx1-ubyte has 5 labels"):
        data.load(f"idx:{tmp_path}")


def test_idx_missing_file_and_directory(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="no t10k-labels-idx1-ubyte"):
        data.load(f"idx:{tmp_path}")
    with pytest.raises(ValueError, match="not a directory"):
        data.load(f"idx:{tmp_path / 'nowhere'}")


# ---- validation before allocation, labels, complex inputs ----------------------------------


@pytest.mark.parametrize(
    "y",
    [
        np.array([0, 1, 2**63], dtype=np.uint64),  # would wrap to a negative int64
        np.array([0, 1, 10**12], dtype=np.int64),
        np.array([0, data.MAX_CLASSES], dtype=np.int64),
    ],
    ids=["uint64-above-int64", "1e12", "max-classes"],
)
def test_npz_refuses_labels_at_or_above_the_class_limit(tmp_path, y):
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.zeros((len(y), 2)), y=y, x_test=np.zeros((1, 2)), y_test=np.zeros(1, dtype=int))
    with pytest.raises(ValueError, match=rf"labels must be below {data.MAX_CLASSES}.*largest is {int(y.max())}"):
        data.load(f"npz:{path}")


def test_npz_accepts_the_largest_allowed_label(tmp_path):
    path = tmp_path / "labels.npz"
    y = np.array([0, data.MAX_CLASSES - 1], dtype=np.uint64)
    np.savez(path, x=np.zeros((2, 2)), y=y, x_test=np.zeros((1, 2)), y_test=np.zeros(1, dtype=np.uint8))
    ds = data.load(f"npz:{path}")
    assert ds.n_classes == data.MAX_CLASSES and ds.y_train.dtype == np.int64


def test_npz_refuses_complex_inputs(tmp_path):
    path = tmp_path / "complex.npz"
    np.savez(path, x=np.full((8, 2), 1 + 2j), y=np.zeros(8, dtype=int))
    with pytest.raises(ValueError, match=r"complex128.*imaginary part"):
        data.load(f"npz:{path}")


def _npz_with_member(path, name, header_shape, payload=b"", dtype="<f8"):
    """An npz whose member `name` has a .npy header claiming `header_shape`, then `payload`."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": header_shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name}.npy", header.getvalue() + payload)
        z.writestr("y.npy", _npy(np.zeros(8, dtype="<i8")))


def _npy(array):
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_npz_refuses_a_header_claiming_more_than_the_file_holds_before_allocating(tmp_path):
    path = tmp_path / "huge.npz"
    _npz_with_member(path, "x", (5 * 2**40, 1))  # 40 TiB of float64, stored in a few bytes
    with pytest.raises(ValueError, match=r"huge.npz: x.npy claims shape \(5497558138880, 1\) of float64.*holds 0"):
        data.load(f"npz:{path}")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_npz_refuses_a_damaged_file_naming_it(tmp_path, damage):
    x, y = _arrays()
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=x, y=y)
    raw = good.read_bytes()
    bad = raw[: len(raw) // 2] if damage == "truncated" else raw[:80] + bytes(b ^ 0xFF for b in raw[80:200]) + raw[200:]
    path = tmp_path / f"{damage}.npz"
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=rf"npz dataset .*{damage}.npz: not a readable .npz file"):
        data.load(f"npz:{path}")


def test_read_idx_gz_checks_the_header_before_decompressing(tmp_path):
    import tracemalloc

    path = tmp_path / "bomb-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.arange(10)) + bytes(32 * 2**20), compresslevel=1))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="trailing bytes"):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB to read a 10-byte array"


def test_read_idx_refuses_a_header_claiming_more_than_the_file_can_hold(tmp_path):
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">III", 60000, 10000, 10000)
    (tmp_path / "claims-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(100)))
    with pytest.raises(ValueError, match=r"claims shape \(60000, 10000, 10000\) of uint8, 6000000000000 bytes.*at most"):
        data.read_idx(tmp_path / "claims-idx3-ubyte.gz")
    (tmp_path / "claims-idx3-ubyte").write_bytes(header + bytes(100))
    with pytest.raises(ValueError, match=r"claims shape \(60000, 10000, 10000\).*the file has 100"):
        data.read_idx(tmp_path / "claims-idx3-ubyte")


@pytest.mark.parametrize("damage", ["truncated", "not-gzip"])
def test_read_idx_refuses_a_bad_gzip_file(tmp_path, damage):
    content = gzip.compress(_idx_bytes(np.arange(100).reshape(10, 10)))
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"plain bytes, no gzip here")
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte.gz: not a readable gzip file"):
        data.read_idx(path)
