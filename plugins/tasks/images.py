"""Built-in image task on real data: Fashion-MNIST (Debian package ``dataset-fashion-mnist``).

- ``fashion-mnist``: 28x28 greyscale photos of clothing in 10 classes; the official split (60,000 train,
  10,000 test) is the task's "train"/"test" split.

The idx gzip files are parsed with numpy (no torchvision download code). Each example is
``{"image": float32 tensor (1, 28, 28) normalised with mean 0.2860 / std 0.3530, "label": int}``; the
images of a split are decoded once per process and the examples are views into one shared tensor.
The files are read from ``$OPTIN_FASHION_MNIST`` if set, else /usr/share/datasets/fashion-mnist.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from optin.errors import OptinError
from optin.hooks import hookimpl
from optin.tasks import Task

INSTALL = "apt-get install dataset-fashion-mnist"
DEFAULT_FOLDER = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "OPTIN_FASHION_MNIST"
MEAN, STD = 0.2860, 0.3530
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
          "Ankle boot"]
FILES = {  # split: (images, labels), as named in the official release
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fashion_mnist_folder() -> Path:
    """The folder holding the idx files: ``$OPTIN_FASHION_MNIST`` or the Debian package's folder."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_FOLDER).expanduser()


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped): 2 zero bytes, a type code, the number of dimensions,
    then one big-endian uint32 per dimension, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise OptinError(f"{path} is not an idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 0
    if len(data) - offset != count * dtype.itemsize:
        raise OptinError(f"{path} is truncated or corrupt: header says {shape} but the file has "
                         f"{len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    how = f"install it with: {INSTALL}" + (f", or point ${ENV_VAR} at a folder holding the Fashion-MNIST idx files"
                                           if ENV_VAR not in os.environ else
                                           f" (${ENV_VAR} is set to {os.environ[ENV_VAR]!r})")
    raise OptinError(f"Fashion-MNIST data not found: no {stem}.gz in {folder}; {how}")


@lru_cache(maxsize=4)
def load_arrays(split: str, folder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The raw ``(images uint8 [N, 28, 28], labels int64 [N])`` of a split, decoded once per process."""
    if split not in FILES:
        raise OptinError(f"unknown split {split!r} for fashion-mnist (use 'train' or 'test')")
    root = Path(folder) if folder else fashion_mnist_folder()
    images = read_idx(_find(root, FILES[split][0]))
    labels = read_idx(_find(root, FILES[split][1])).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise OptinError(f"Fashion-MNIST {split} files in {root} disagree: images {images.shape}, "
                         f"labels {labels.shape}")
    return images, labels


@lru_cache(maxsize=4)
def load_tensors(split: str, folder: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``(images float32 [N, 1, 28, 28], labels int64 [N])`` of a split (cached)."""
    images, labels = load_arrays(split, folder)
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, torch.from_numpy(labels)


def load_fashion_mnist(split: str) -> list[dict]:
    """The examples of ``split``: ``{"image": view of a shared [N, 1, 28, 28] tensor, "label": int}``."""
    x, y = load_tensors(split, str(fashion_mnist_folder()))
    return [{"image": img, "label": lab} for img, lab in zip(x.unbind(0), y.tolist())]


@hookimpl
def optin_tasks() -> dict[str, Task]:
    return {
        "fashion-mnist": Task("fashion-mnist", "Fashion-MNIST clothing photos, 10 classes, 28x28 greyscale "
                              "(official 60k/10k split; Debian dataset-fashion-mnist)", list(LABELS),
                              load_fashion_mnist, kind="image"),
    }
