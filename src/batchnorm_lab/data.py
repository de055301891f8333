"""Datasets for the experiments, and input standardization.

`load(spec)` returns a `Dataset` of flat float32 features and int64 labels, split into train
and test. The spec names where the data comes from:

- `digits`: scikit-learn's bundled 8x8 digits (1,797 images, ships with scikit-learn; the
  default); a stratified 75/25 split with a fixed seed.
- `mnist1d`: MNIST-1D (Greydanus 2020), generated offline by `mnist1d.data.make_dataset`
  with its default arguments (4,000 train, 1,000 test sequences of length 40). Never
  `get_dataset`, which downloads.
- `teacher`: a synthetic teacher network: x ~ N(0, I_32), y = argmax of a fixed random
  two-layer tanh network's 10 outputs.
- `npz:PATH`: arrays `x`, `y`, and optionally `x_test`, `y_test` (otherwise 25% of `x` is
  held out).
- `idx:DIR`: MNIST-format IDX files in DIR (`train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each
  optionally gzipped).

Inputs are returned raw (digits: pixel counts 0..16, IDX: bytes 0..255); `standardize`
fits a `StandardScaler` on the training inputs only and applies it to both splits;
`standardize_global` uses one mean and one std over all training inputs instead.

What a file may hold (anything else is a ValueError naming the file and the problem):
inputs real numbers (integer, float or bool; complex inputs are refused rather than losing
their imaginary part), finite; labels integers in [0, MAX_CLASSES), so n_classes is at
most MAX_CLASSES (a label of 1e12 or a uint64 beyond int64 is a data error, not a class).
Sizes are checked before anything is allocated: an npz member's .npy header and an IDX
header must describe exactly the bytes that follow, and cannot claim more than the file
(uncompressed, or inflated at deflate's maximum ratio) can hold; an IDX `.gz` file is
decompressed as a stream, its header checked first.
"""

from __future__ import annotations

import functools
import gzip
import math
import random
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

SPLIT_SEED = 0  # the train/test split of digits and of npz files without a test split
# Labels are class indices 0..k-1 and each class is one output of a classifier head: larger
# labels are IDs or corrupt values, not classes (ImageNet-21k, among the largest, has 21,841).
MAX_CLASSES = 100_000
# Deflate's largest expansion (258 bytes from a 2-bit code, less block overhead): no deflate
# stream of c bytes inflates to more than c * 1032, so a header claiming more is a lie.
DEFLATE_MAX_RATIO = 1032


@dataclass(frozen=True)
class Dataset:
    """A classification dataset: x (n, features) float32, y (n,) int64 in [0, n_classes)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    sample_shape: tuple[int, ...]  # the shape of one example before flattening

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test examples, "
            f"{self.n_features} features, {self.n_classes} classes"
        )


DATASETS = ("digits", "mnist1d", "teacher", "npz:PATH", "idx:DIR")


def load(spec: str = "digits") -> Dataset:
    """The dataset named by `spec` (see the module docstring); raises ValueError if malformed."""
    if not isinstance(spec, str):
        raise TypeError(f"dataset spec must be a string such as 'digits', got {type(spec).__name__}")
    return _load_cached(spec)


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str) -> Dataset:
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _digits()
    if kind == "mnist1d" and not arg:
        return _mnist1d()
    if kind == "teacher" and not arg:
        return _teacher()
    if kind == "npz" and arg:
        return _npz(Path(arg))
    if kind == "idx" and arg:
        return _idx(Path(arg))
    raise ValueError(f"unknown dataset {spec!r}: use one of {', '.join(DATASETS)}")


def standardize(ds: Dataset) -> Dataset:
    """The dataset with each feature scaled to mean 0, variance 1 on the training split.

    The scaler is fitted on `x_train` only, so nothing about the test split leaks into
    training; constant features (variance 0) are only centred.
    """
    scaler = fit_scaler(ds.x_train)
    return replace(
        ds,
        x_train=transform(scaler, ds.x_train),
        x_test=transform(scaler, ds.x_test),
    )


def standardize_global(ds: Dataset) -> Dataset:
    """The dataset shifted and scaled by one mean and one std over all training inputs.

    Unlike `standardize`, every feature keeps its scale relative to the others (an image's
    pixels stay comparable), which is what a convolution, sharing its weights across
    positions, needs. Fitted on `x_train` only.
    """
    mean, std = float(ds.x_train.mean()), float(ds.x_train.std())
    scale = lambda x: ((x - mean) / (std if std > 0 else 1.0)).astype(np.float32)  # noqa: E731
    return replace(ds, x_train=scale(ds.x_train), x_test=scale(ds.x_test))


def fit_scaler(x_train: np.ndarray) -> StandardScaler:
    """A StandardScaler fitted on (n, features) training inputs."""
    return StandardScaler().fit(x_train)


def transform(scaler: StandardScaler, x: np.ndarray) -> np.ndarray:
    """(x - mean) / std per feature, as float32."""
    return scaler.transform(x).astype(np.float32)


def _make(name, x, y, x_test, y_test, sample_shape=None) -> Dataset:
    """Flatten, cast, and check a split dataset; labels must be integers 0..MAX_CLASSES-1."""
    x, x_test = np.asarray(x), np.asarray(x_test)
    y, y_test = np.asarray(y), np.asarray(y_test)
    for what, xs, ys in (("train", x, y), ("test", x_test, y_test)):
        _check_split(name, what, xs, ys)
    if x.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name}: train examples are {x.shape[1:]} but test examples are {x_test.shape[1:]}")
    flat = lambda a: np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32)  # noqa: E731
    if not (np.isfinite(flat(x)).all() and np.isfinite(flat(x_test)).all()):
        raise ValueError(f"{name}: inputs contain NaN or infinity")
    return Dataset(
        name=name,
        x_train=flat(x),
        y_train=y.astype(np.int64),
        x_test=flat(x_test),
        y_test=y_test.astype(np.int64),
        n_classes=int(max(y.max(), y_test.max())) + 1,
        sample_shape=tuple(sample_shape or x.shape[1:]),
    )


def _check_split(name: str, what: str, xs: np.ndarray, ys: np.ndarray) -> None:
    """Inputs (n, features...) of real numbers and labels (n,) of class indices."""
    if xs.ndim < 2 or ys.ndim != 1 or len(xs) != len(ys):
        raise ValueError(
            f"{name}: {what} inputs of shape {xs.shape} and labels of shape {ys.shape} do not "
            "match: inputs must be (n, features...) and labels (n,)"
        )
    if len(xs) == 0:
        raise ValueError(f"{name}: the {what} split is empty")
    if np.iscomplexobj(xs):
        raise ValueError(
            f"{name}: {what} inputs are {xs.dtype}; casting to float32 would drop the imaginary "
            "part: store real features (e.g. the real and imaginary parts side by side)"
        )
    if not (np.issubdtype(xs.dtype, np.number) or xs.dtype == np.bool_):
        raise ValueError(f"{name}: {what} inputs must be numbers, got {xs.dtype}")
    if not np.issubdtype(ys.dtype, np.integer) or ys.min() < 0:
        raise ValueError(f"{name}: {what} labels must be non-negative integers, got {ys.dtype}")
    if ys.max() >= MAX_CLASSES:  # compared in the labels' own dtype: no wrap-around
        raise ValueError(
            f"{name}: {what} labels must be below {MAX_CLASSES} (class indices 0..k-1); the largest "
            f"is {ys.max()}. Map them to indices first, e.g. np.unique(y, return_inverse=True)[1]"
        )


def _split(x, y):
    return train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, x_test, y, y_test = _split(digits.data, digits.target)
    return _make("digits", x, y, x_test, y_test, sample_shape=(8, 8))


def _mnist1d() -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds Python's and NumPy's global generators; put them back after.
    state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    return _make("mnist1d", d["x"], d["y"], d["x_test"], d["y_test"])


def _teacher(n_train: int = 4000, n_test: int = 1000, features: int = 32, classes: int = 10) -> Dataset:
    """Labels from a fixed random network, so the task is learnable exactly by a small MLP."""
    rng = np.random.default_rng(1234)
    w1 = rng.standard_normal((features, 64)) / np.sqrt(features)
    w2 = rng.standard_normal((64, classes)) / np.sqrt(64)
    x = rng.standard_normal((n_train + n_test, features))
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    return _make("teacher", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


# What a damaged zip member raises while it is read (numpy's own format errors are ValueError).
_NPZ_DAMAGE = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def _npz(path: Path) -> Dataset:
    if not path.is_file():
        raise ValueError(f"npz dataset: no file at {path}")
    try:
        arrays = np.load(path, allow_pickle=False)
    except _NPZ_DAMAGE as error:
        raise ValueError(f"npz dataset {path}: not a readable .npz file ({error})") from error
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ValueError(f"npz dataset {path}: not a readable .npz file (it holds one .npy array, not a zip)")
    with arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise ValueError(f"npz dataset {path}: missing array(s) {sorted(missing)}; it has {arrays.files}")
        has_test = {"x_test", "y_test"} & set(arrays.files)
        if has_test and has_test != {"x_test", "y_test"}:
            raise ValueError(f"npz dataset {path}: give both x_test and y_test, or neither")
        x, y = _npz_array(path, arrays, "x"), _npz_array(path, arrays, "y")
        if len(x) != len(y):
            raise ValueError(f"npz dataset {path}: {len(x)} inputs but {len(y)} labels")
        if has_test:
            x_test, y_test = _npz_array(path, arrays, "x_test"), _npz_array(path, arrays, "y_test")
        else:
            x, x_test, y, y_test = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED)
    return _make(f"npz:{path.name}", x, y, x_test, y_test)


def _npz_array(path: Path, arrays, name: str) -> np.ndarray:
    """One array of the npz, read only once its header is shown to fit the member."""
    try:
        info = arrays.zip.getinfo(f"{name}.npy" if f"{name}.npy" in arrays.zip.namelist() else name)
        with arrays.zip.open(info) as member:
            shape, dtype = _npy_header(member)
            header = member.tell()
    except _NPZ_DAMAGE as error:
        raise ValueError(f"npz dataset {path}: not a readable .npz file ({error})") from error
    claimed, held = math.prod(shape) * dtype.itemsize, info.file_size - header
    if claimed != held or held > _most_inflated(info) - header:
        raise ValueError(
            f"npz dataset {path}: {info.filename} claims shape {shape} of {dtype} ({claimed} bytes) "
            f"but holds {max(held, 0)} bytes of values; the file is damaged"
        )
    try:
        return arrays[name]
    except _NPZ_DAMAGE as error:
        raise ValueError(f"npz dataset {path}: not a readable .npz file ({type(error).__name__}: {error})") from error


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of a .npy stream, left positioned at the values."""
    version = np.lib.format.read_magic(f)
    # Format 3.0 differs from 2.0 only in allowing utf-8 in the header text.
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def _most_inflated(info: zipfile.ZipInfo) -> int:
    """The most bytes a zip member of its compressed size can hold."""
    if info.compress_type == zipfile.ZIP_STORED:
        return info.compress_size
    if info.compress_type == zipfile.ZIP_DEFLATED:
        return info.compress_size * DEFLATE_MAX_RATIO
    return info.file_size  # bzip2, lzma: no tight bound; numpy never writes them


# IDX: magic = two zero bytes, a type code, the number of dimensions; then one big-endian
# uint32 per dimension; then the values, row-major, big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file (gzipped or not); ValueError if it is malformed.

    The header is read and checked first, and the values it announces bounded by what the
    file can hold, before any buffer for them is allocated; a `.gz` file is read as a stream.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            shape, dtype, header = _idx_header(f, path)
            size = math.prod(shape) * dtype.itemsize
            _check_idx_size(path, shape, dtype, header, size, gz)
            values = _read_at_most(f, size + 1)  # one byte more tells trailing bytes apart
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"IDX file {path}: not a readable {'gzip ' if gz else ''}file ({error})") from error
    if len(values) != size:
        raise ValueError(
            f"IDX file {path}: {'truncated' if len(values) < size else 'trailing bytes'}: the header "
            f"claims shape {shape} of {dtype}, {size} bytes of values; the data stream has "
            f"{'only ' + str(len(values)) if len(values) < size else 'more'}"
        )
    return np.frombuffer(values, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) read from the start of an IDX stream."""
    magic = f.read(4)
    if len(magic) < 4:
        raise ValueError(f"IDX file {path}: {len(magic)} bytes, too short for the 4-byte magic number")
    zeros, type_code, ndim = magic[0:2], magic[2], magic[3]
    if zeros != b"\0\0" or type_code not in _IDX_TYPES or ndim == 0:
        raise ValueError(
            f"IDX file {path}: wrong magic number 0x{int.from_bytes(magic, 'big'):08x}; expected "
            "0x000008NN (0x00000801 labels, 0x00000803 images). Is this an MNIST-format file?"
        )
    header = 4 + 4 * ndim
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"IDX file {path}: truncated header ({4 + len(dims)} of {header} bytes)")
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    return shape, np.dtype(_IDX_TYPES[type_code]), header


def _check_idx_size(path: Path, shape, dtype, header: int, size: int, gz: bool) -> None:
    """Refuse a header announcing more values than the file can hold, before reading them:
    a plain file holds exactly its size after the header, a gzip file at most
    DEFLATE_MAX_RATIO times its size."""
    on_disk = path.stat().st_size
    if not gz and size != on_disk - header:
        raise ValueError(
            f"IDX file {path}: {'truncated' if size > on_disk - header else 'trailing bytes'}: the "
            f"header claims shape {shape} of {dtype}, {size} bytes of values; the file has "
            f"{on_disk - header} after the {header}-byte header"
        )
    if gz and size > on_disk * DEFLATE_MAX_RATIO:
        raise ValueError(
            f"IDX file {path}: the header claims shape {shape} of {dtype}, {size} bytes of values, "
            f"more than a {on_disk}-byte gzip file can hold (at most {on_disk * DEFLATE_MAX_RATIO}); "
            "the file is damaged or not IDX"
        )


def _read_at_most(f, limit: int, chunk: int = 1 << 20) -> bytearray:
    """Up to `limit` bytes of `f`, read a chunk at a time: memory grows with the bytes
    actually there, not with `limit` (a single read(limit) allocates it all up front)."""
    out = bytearray()
    while len(out) < limit:
        part = f.read(min(chunk, limit - len(out)))
        if not part:
            break
        out += part
    return out


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"idx dataset: {directory} has no {stem} (or {stem}.gz)")


def _idx(directory: Path) -> Dataset:
    if not directory.is_dir():
        raise ValueError(f"idx dataset: {directory} is not a directory")
    splits = {}
    for split, (images_name, labels_name) in _IDX_FILES.items():
        images = read_idx(_find(directory, images_name))
        labels = read_idx(_find(directory, labels_name))
        if labels.ndim != 1:
            raise ValueError(f"idx dataset: {labels_name} holds an array of shape {labels.shape}, not labels (n,)")
        if len(images) != len(labels):
            raise ValueError(
                f"idx dataset: {images_name} has {len(images)} images but {labels_name} has {len(labels)} labels"
            )
        splits[split] = images, labels
    (x, y), (x_test, y_test) = splits["train"], splits["test"]
    return _make(f"idx:{directory.name}", x, y, x_test, y_test)
