"""Image files as data (``--data`` / ``--eval-data``): image folders, CSV/JSONL files of image paths, and
segmentation folders of image + mask pairs.

Layouts:

- classification folder (torchvision's ImageFolder): ``DIR/<class>/<image>``, one sub-folder per class
  (class names sorted), images at any depth below it;
- a CSV/JSONL file with an image path column (``image`` or ``path``, relative to the file's folder) and
  ``label``;
- segmentation folder: ``DIR/images/<name>.<ext>`` and ``DIR/masks/<name>.png`` (same stem), a mask being a
  single-channel image of the same size whose pixel values are class ids (255 = ignore); class names from
  ``DIR/classes.txt`` (one a line, line i = class i) when present, else ``0 .. highest id found``.

Examples hold file paths and are decoded one at a time when a batch is made (``ImageExample``), with the
preprocessing of the model they are fed to (``Adapter.image_transform``, set by ``Task.prepare``): nothing is
decoded up front, and the user gives no sizes or statistics. A bad file (missing, undecodable, a mask of
another size or with unknown class ids) is one OptinError naming it.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import OptinError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
IGNORE = 255  # mask value of pixels that count for no class
LAYOUTS = ("an image folder with one sub-folder per class (DIR/<class>/<image>), a segmentation folder "
           "(DIR/images/<name>.png + DIR/masks/<name>.png), or a CSV/JSONL file with columns text,label or "
           "image,label")


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


class ImageReader:
    """Decodes the image files of one task with the transform of the model they are fed to (``use``)."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.transform: Callable[[Any], torch.Tensor] | None = None
        self.num_classes: int | None = None  # segmentation: class ids in masks must be below it

    def use(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def open(self, path: Path) -> Any:
        """The decoded PIL image at ``path`` (one line naming the file when it cannot be read)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                return img
        except FileNotFoundError:
            raise OptinError(f"image file {str(path)!r} does not exist") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise OptinError(f"cannot decode image file {str(path)!r}: {' '.join(str(exc).split())[:160]}; "
                             "re-save it as PNG or JPEG, or remove it") from None

    def image(self, path: Path) -> torch.Tensor:
        """The model's input tensor (C, H, W) for the image file at ``path``."""
        if self.transform is None:
            raise OptinError(f"the images of task {self.task!r} are decoded with a model's preprocessing: call "
                             "task.prepare(adapter) first (optin run does)")
        try:
            out = self.transform(self.open(path))
        except OptinError:
            raise
        except Exception as exc:  # noqa: BLE001 - an odd image (mode, size) is bad input
            raise OptinError(f"cannot preprocess image file {str(path)!r} for the model: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:160]}") from None
        if not torch.is_tensor(out) or out.dim() != 3:
            raise OptinError(f"the model's image transform gave {type(out).__name__} "
                             f"{tuple(out.shape) if torch.is_tensor(out) else ''} for {path}, not a (C, H, W) tensor")
        return out

    def mask(self, path: Path, image: Path, hw: tuple[int, int]) -> torch.Tensor:
        """The class-id map (H, W) long of the mask file ``path``, resized (nearest) to ``hw``; it must be a
        single-channel image of ``image``'s size with ids below the task's number of classes (or 255)."""
        import numpy as np
        from PIL import Image

        m = self.open(path)
        with Image.open(image) as img:
            size = img.size  # the header only
        if m.size != size:
            raise OptinError(f"mask {str(path)!r} is {m.size[0]}x{m.size[1]} but its image {str(image)!r} is "
                             f"{size[0]}x{size[1]}; a mask must have its image's size")
        ids = np.array(m)
        if ids.ndim != 2:
            raise OptinError(f"mask {str(path)!r} has {ids.shape[-1]} channels ({m.mode}); a mask is a single-channel "
                             "image (mode L, P or I) whose pixel values are class ids, 255 = ignore")
        ids = torch.from_numpy(ids.astype(np.int64))
        if self.num_classes is not None:
            bad = ids[(ids >= self.num_classes) & (ids != IGNORE)]
            if bad.numel():
                raise OptinError(f"mask {str(path)!r} has class id {int(bad.max())} but task {self.task!r} has "
                                 f"{self.num_classes} classes (0..{self.num_classes - 1}, 255 = ignore); fix the mask "
                                 "or list every class in classes.txt")
        if tuple(ids.shape) != tuple(hw):
            ids = torch.nn.functional.interpolate(ids[None, None].float(), size=tuple(hw), mode="nearest")[0, 0].long()
        return ids


class ImageExample(Mapping):
    """One example whose ``image`` (and ``mask``) are decoded from files when read; ``label`` as given."""

    __slots__ = ("reader", "path", "label", "mask_path", "_hw")

    def __init__(self, reader: ImageReader, path: Path, label: int | None = None, mask_path: Path | None = None
                 ) -> None:
        self.reader, self.path, self.label, self.mask_path = reader, path, label, mask_path
        self._hw: tuple[int, int] | None = None

    def _keys(self) -> tuple[str, ...]:
        return ("image",) + (("label",) if self.label is not None else ()) + (("mask",) if self.mask_path else ())

    def __getitem__(self, key: str) -> Any:
        if key == "image":
            image = self.reader.image(self.path)
            self._hw = (int(image.shape[-2]), int(image.shape[-1]))
            return image
        if key == "label" and self.label is not None:
            return self.label
        if key == "mask" and self.mask_path is not None:
            if self._hw is None:
                self["image"]
            return self.reader.mask(self.mask_path, self.path, self._hw)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __repr__(self) -> str:
        return f"ImageExample({self.path}{'' if self.label is None else f', label {self.label}'})"


# --- reading the layouts -----------------------------------------------------------------------------------
# Each reader returns (items, class names): items are (key, label name or None, image path, mask path or None);
# the key (a path relative to the root) decides the hash split.
Item = tuple[str, "str | None", Path, "Path | None"]


def folder_kind(root: Path) -> str:
    """"segmentation" (images/ + masks/) or "classes" (class sub-folders); one line saying what was found
    otherwise."""
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "segmentation"
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if subdirs:
        return "classes"
    files = [f for f in root.iterdir() if f.is_file()]
    pictures = sum(is_image(f) for f in files)
    found = f"{len(files)} files ({pictures} images) and no sub-folders" if files else "nothing"
    raise OptinError(f"data folder {str(root)!r} holds {found}; --data takes {LAYOUTS}"
                     + ("; put the images into one sub-folder per class" if pictures else ""))


def read_class_folder(root: Path) -> tuple[list[Item], list[str]]:
    """``root/<class>/<image>`` (images at any depth below the class folder; other files skipped)."""
    classes = [d.name for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    items: list[Item] = []
    for name in classes:
        found = sorted(p for p in (root / name).rglob("*") if is_image(p))
        if not found:
            raise OptinError(f"class folder {str(root / name)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                             "remove it or add its images")
        items += [(str(p.relative_to(root)), name, p, None) for p in found]
    return items, classes


def read_segmentation_folder(root: Path) -> tuple[list[Item], list[str] | None]:
    """``root/images/<name>`` + ``root/masks/<name>.png``; class names from ``root/classes.txt`` or None."""
    masks = {p.stem: p for p in sorted((root / "masks").iterdir()) if is_image(p)}
    items: list[Item] = []
    for image in sorted(p for p in (root / "images").iterdir() if is_image(p)):
        mask = masks.get(image.stem)
        if mask is None:
            raise OptinError(f"image {str(image)!r} has no mask: expected {str(root / 'masks' / (image.stem + '.png'))!r} "
                             "(a mask shares its image's file name stem)")
        items.append((image.name, None, image, mask))
    if not items:
        raise OptinError(f"segmentation folder {str(root)!r}: images/ holds no images")
    names = root / "classes.txt"
    classes = [line.strip() for line in names.read_text().splitlines() if line.strip()] if names.is_file() else None
    return items, classes


def mask_classes(items: list[Item]) -> list[str]:
    """Class names ``0 .. highest id`` over every mask (255 = ignore); read when there is no classes.txt."""
    import numpy as np

    reader = ImageReader("")
    top = 0
    for _, _, _, mask in items:
        ids = np.unique(np.array(reader.open(mask)))
        ids = ids[ids != IGNORE]
        if ids.size:
            top = max(top, int(ids.max()))
    return [str(i) for i in range(top + 1)]


def read_image_rows(path: Path, rows: list[dict], column: str) -> list[Item]:
    """Rows of a CSV/JSONL with an image path ``column`` (relative to the file's folder) and ``label``."""
    items: list[Item] = []
    for i, row in enumerate(rows):
        value, label = row.get(column), row.get("label")
        if value in (None, "") or label in (None, ""):
            raise OptinError(f"data file {str(path)!r} needs columns {column!r} and 'label' in every row; row {i + 1} "
                             f"has: {', '.join(k for k, v in row.items() if v not in (None, '')) or 'nothing'}")
        image = (path.parent / str(value)).expanduser()
        if not image.is_file():
            raise OptinError(f"data file {str(path)!r} row {i + 1}: image {str(value)!r} not found (looked for "
                             f"{str(image)!r}; paths are relative to the data file's folder)")
        items.append((str(value), str(label), image, None))
    return items
