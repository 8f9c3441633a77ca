"""Built-in tasks on real images for segmentation models and CNNs.

- ``fmnist-mosaic`` (segmentation, labelled): 64x64 greyscale canvases holding 1-4 real Fashion-MNIST
  items, one per 32x32 quadrant with a random offset; the per-pixel label is 0 (background) or 1 + the
  item's class where the item's own pixel is lit (raw intensity > 0.2). Train mosaics are built from the
  official train split, test mosaics from the official test split (8,000 / 1,000, seeded).
- ``photos`` (classification, unlabelled): 224x224 crops of the real photos shipped with scikit-image
  (astronaut, cat, coffee, rocket, motorcycle, ...), ImageNet-normalised RGB. Metric "agreement": top-1
  agreement of the pruned with the unpruned model. Calibration crops come from other photos than the
  evaluation crops.
- ``photos-seg`` (segmentation, unlabelled): the same photos as 128x128 crops, metric "agreement" = mIoU of
  the pruned model's prediction against the unpruned model's.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from optin.errors import OptinError
from optin.hooks import hookimpl
from optin.tasks import Task

from .images import LABELS as FMNIST_LABELS
from .images import MEAN as FMNIST_MEAN
from .images import STD as FMNIST_STD
from .images import load_arrays

MOSAIC_SIZE = 64
MOSAIC_COUNTS = {"train": 8000, "test": 1000}
LIT = 0.2  # raw intensity above which a pixel belongs to its item

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# scikit-image's bundled photos (no download): calibration ("train") and evaluation ("test") use different ones.
PHOTOS = {
    "train": ["chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png", "coins.png",
              "moon.png", "gravel.png", "cell.png"],
    "test": ["astronaut.png", "coffee.png", "motorcycle_right.png", "retina.jpg", "camera.png", "grass.png",
             "brick.png", "clock_motion.png"],
}
CROPS_PER_PHOTO = 24


def make_mosaic(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                size: int = MOSAIC_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One canvas (size, size) uint8 and its label map (size, size) int64 from up to 4 items (28x28 uint8)."""
    canvas = np.zeros((size, size), np.uint8)
    target = np.zeros((size, size), np.int64)
    cell = size // 2
    for q, (item, label) in enumerate(zip(items, labels)):
        top = (q // 2) * cell + int(rng.integers(0, cell - 28 + 1))
        left = (q % 2) * cell + int(rng.integers(0, cell - 28 + 1))
        lit = item > LIT * 255
        canvas[top:top + 28, left:left + 28] = np.where(lit, item, canvas[top:top + 28, left:left + 28])
        target[top:top + 28, left:left + 28][lit] = int(label) + 1
    return canvas, target


@lru_cache(maxsize=2)
def mosaic_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 1, 64, 64) and label maps (N, 64, 64) of a split (built once per process)."""
    images, labels = load_arrays(split)
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    n = MOSAIC_COUNTS[split]
    xs = np.zeros((n, MOSAIC_SIZE, MOSAIC_SIZE), np.uint8)
    ys = np.zeros((n, MOSAIC_SIZE, MOSAIC_SIZE), np.int64)
    for i in range(n):
        items = np.zeros((4, 28, 28), np.uint8)
        classes = np.full(4, -1)
        for q in rng.choice(4, size=int(rng.integers(1, 5)), replace=False):
            p = int(rng.integers(0, len(images)))
            items[q], classes[q] = images[p], labels[p]
        xs[i], ys[i] = make_mosaic(items, classes, rng)
    x = torch.from_numpy(xs.astype(np.float32)).div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD).unsqueeze(1)
    return x, torch.from_numpy(ys)


def load_mosaic(split: str) -> list[dict]:
    x, y = mosaic_tensors(split)
    return [{"image": img, "mask": m} for img, m in zip(x.unbind(0), y.unbind(0))]


def photos_folder() -> Path:
    try:
        import skimage
    except ImportError as exc:
        raise OptinError("the photos tasks need scikit-image's bundled photos: pip install 'optin[photos]'") from exc
    return Path(skimage.__file__).parent / "data"


def read_photo(path: Path) -> torch.Tensor:
    """A photo as float RGB (3, H, W) in [0, 1] (greyscale is repeated, alpha dropped)."""
    from skimage import io

    img = np.asarray(io.imread(path))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def photo_crops(split: str, size: int, per_photo: int = CROPS_PER_PHOTO) -> list[torch.Tensor]:
    """Seeded random square crops (30-100% of the short side) of each photo of ``split``, resized to
    ``size`` and ImageNet-normalised: (3, size, size) each."""
    folder = photos_folder()
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crops = []
    for name in PHOTOS[split]:
        photo = read_photo(folder / name)
        _, h, w = photo.shape
        for _ in range(per_photo):
            side = int(min(h, w) * (0.3 + 0.7 * torch.rand((), generator=g).item()))
            top = int(torch.randint(0, h - side + 1, (), generator=g))
            left = int(torch.randint(0, w - side + 1, (), generator=g))
            crop = photo[:, top:top + side, left:left + side].unsqueeze(0)
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            crops.append((crop - mean) / std)
    return crops


def _photos(size: int):
    @lru_cache(maxsize=2)
    def load(split: str) -> list[dict]:
        if split not in PHOTOS:
            raise OptinError(f"unknown split {split!r} (use 'train' or 'test')")
        return [{"image": c} for c in photo_crops(split, size)]

    return load


@hookimpl
def optin_tasks() -> dict[str, Task]:
    return {
        "fmnist-mosaic": Task("fmnist-mosaic", "64x64 mosaics of 1-4 Fashion-MNIST items, per-pixel labels "
                              "(background + 10 classes; Debian dataset-fashion-mnist)",
                              ["background", *FMNIST_LABELS], load_mosaic, metric="miou", kind="image",
                              target="segmentation"),
        "photos": Task("photos", "224x224 crops of scikit-image's real photos (unlabelled): top-1 agreement with "
                       "the unpruned model", [], _photos(224), metric="agreement", kind="image"),
        "photos-seg": Task("photos-seg", "128x128 crops of scikit-image's real photos (unlabelled): mIoU against "
                           "the unpruned model's segmentation", [], _photos(128), metric="agreement",
                           kind="image", target="segmentation"),
    }
