"""Data tasks: labelled examples for calibration and evaluation.

Tasks come from the ``optin_tasks`` hook (built-ins in ``plugins/tasks``) or from the user's own files given
with ``--data`` (and ``--eval-data`` for their own held-out split): a CSV or JSON lines file with a ``text``
column (optional ``text_pair``) and ``label``; images as a class folder, a CSV/JSONL with an ``image`` (or
``path``) column, or a segmentation folder of image + mask pairs (``optin.images``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import images
from .errors import OptinError
from .images import ImageReader
from .hooks import collect
from .registry import unknown_name_message

Example = dict  # {"text": str, ..., "label": int}


@dataclass
class Task:
    """A task: ``loader(split)`` returns examples for "train" or "test".

    ``target`` is what a model must predict: "classes" (examples carry ``label``) or "segmentation"
    (examples carry ``image`` and, when labelled, ``mask`` (H, W) with 255 = ignore). ``metric`` is
    "accuracy", "miou" or "agreement" (unlabelled data: fidelity to the unpruned model).
    """

    name: str
    description: str
    labels: list[str]
    loader: Callable[[str], list[Example]]
    metric: str = "accuracy"
    kind: str = "text"
    target: str = "classes"
    # What the "test" split is, for the report (e.g. "eval-data FILE" or "hash split of FILE (20%)").
    eval_split: str = "the task's test split"
    # Image files decoded with the model's preprocessing, set by ``prepare`` (None: examples hold tensors).
    images: ImageReader | None = field(default=None, repr=False)
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def examples(self, split: str) -> list[Example]:
        if split not in self._cache:
            self._cache[split] = self.loader(split)
        return self._cache[split]

    def prepare(self, adapter: Any, source: str | None = None) -> "Task":
        """Ready the examples for ``adapter``'s model: image files are decoded with its ``image_transform``.
        An image task for a model that takes no images, or a text task for one that takes images, is refused
        in one line. Returns the task."""
        model = f"model {source!r} (adapter {adapter.name!r})" if source else f"adapter {adapter.name!r}"
        transform = adapter.image_transform()
        if self.images is not None:
            if transform is None:
                raise OptinError(f"task {self.name!r} is images ({self.description}) but {model} takes no images; pass "
                                 "an image model, or text data (a CSV/JSONL with columns text,label)")
            self.images.use(transform)
        elif self.kind == "text" and transform is not None:
            raise OptinError(f"task {self.name!r} is text ({self.description}) but {model} takes images; pass "
                             "images: a folder with one sub-folder per class (DIR/<class>/<image>), a CSV/JSONL with "
                             "columns image,label, or a built-in image task (optin list)")
        return self


def split_of(key: str, test_fraction: float = 0.2) -> str:
    """Deterministic train/test assignment from a stable hash of the example text."""
    bucket = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % 1000
    return "test" if bucket < test_fraction * 1000 else "train"


def known_tasks() -> dict[str, Task]:
    return collect("optin_tasks")


def get_task(name: str) -> Task:
    tasks = known_tasks()
    if name not in tasks:
        raise OptinError(unknown_name_message("task", name, sorted(tasks),
                                              "; or pass your own labelled file with --data FILE.csv"))
    return tasks[name]


@dataclass
class DataFile:
    """What a ``--data``/``--eval-data`` file or folder holds: its kind ("text", "image" or "segmentation"), its
    rows ``(split key, label name or None, fields)`` (text: ``text``/``text_pair``; images: ``path``/``mask``)
    and the class names a folder declares (class folders, classes.txt)."""

    path: Path
    kind: str
    rows: list[tuple[str, str | None, dict]]
    classes: list[str] | None = None

    @property
    def what(self) -> str:
        return {"text": "a text file", "image": "images", "segmentation": "a segmentation folder"}[self.kind]


def _read_table(path: Path) -> list[dict]:
    """The rows of a CSV or JSON lines file (one line naming the file when it is neither)."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    if b"\0" in head or head.startswith((b"PK\x03\x04", b"\x89PNG", b"\x93NUMPY", b"\xff\xd8")):
        kind = "a NumPy/zip archive" if head.startswith((b"PK", b"\x93NUMPY")) else "a binary file"
        raise OptinError(f"data file {str(path)!r} is {kind}, not a CSV/JSONL text file; --data takes "
                         f"{images.LAYOUTS}")
    try:
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
    except (ValueError, csv.Error, UnicodeDecodeError, OSError) as exc:
        raise OptinError(f"cannot read data file {str(path)!r}: {' '.join(str(exc).split())}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise OptinError(f"data file {str(path)!r}: row {i + 1} is a {type(row).__name__}, not an object; "
                             'each line must be a JSON object such as {"text": "...", "label": "..."}')
    if not rows:
        raise OptinError(f"data file {str(path)!r} has no rows; it needs columns text,label (or image,label)")
    return rows


def read_data(path: str | Path) -> DataFile:
    """Read a ``--data`` file or folder: the kind is detected from it (a folder: images/ + masks/ is
    segmentation, sub-folders are classes; a table: a ``text`` column is text, an ``image``/``path`` column
    images)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if images.folder_kind(path) == "segmentation":
            items, classes = images.read_segmentation_folder(path)
            return DataFile(path, "segmentation", [(k, None, {"path": p, "mask": m}) for k, _, p, m in items], classes)
        items, classes = images.read_class_folder(path)
        return DataFile(path, "image", [(k, lab, {"path": p}) for k, lab, p, _ in items], classes)
    if not path.is_file():
        raise OptinError(f"data file {str(path)!r} does not exist")
    rows = _read_table(path)
    column = next((c for c in ("text", "image", "path") if c in rows[0]), None)
    if column in ("image", "path"):
        items = images.read_image_rows(path, rows, column)
        return DataFile(path, "image", [(k, lab, {"path": p}) for k, lab, p, _ in items])
    for i, row in enumerate(rows):
        if "text" not in row or "label" not in row or row["text"] is None or row["label"] is None:
            raise OptinError(f"data file {str(path)!r} needs columns 'text' and 'label' in every row (or 'image' and "
                             f"'label' for images); row {i + 1} has: {', '.join(map(str, row)) or 'nothing'}")
    return DataFile(path, "text", [(str(r["text"]), str(r["label"]),
                                    {"text": str(r["text"]), **({"text_pair": str(r["text_pair"])}
                                                                if r.get("text_pair") else {})}) for r in rows])


def file_task(path: str | Path, test_fraction: float = 0.2, eval_path: str | Path | None = None) -> Task:
    """A task from the user's own data (``read_data``). Without ``eval_path`` about ``test_fraction`` of the
    examples are held out by a stable hash of their text (images: their path); with it, every example of
    ``path`` is for calibration (and fine-tuning) and ``eval_path`` (same kind) is the test split. Labels are
    those of ``path``; an ``eval_path`` label it does not have is refused."""
    data = read_data(path)
    held = read_data(eval_path) if eval_path is not None else None
    if held is not None and held.kind != data.kind:
        raise OptinError(f"--eval-data {str(held.path)!r} is {held.what} but --data {str(data.path)!r} is {data.what}; "
                         "give both in the same form")
    if data.kind == "segmentation":
        labels = data.classes or (held.classes if held is not None else None) or \
            images.mask_classes([(k, None, f["path"], f["mask"]) for k, _, f in data.rows + (held.rows if held else [])])
    else:
        labels = data.classes or sorted({lab for _, lab, _ in data.rows})
    index = {lab: i for i, lab in enumerate(labels)}
    if held is not None:
        for key, lab, _ in held.rows:
            if lab is not None and lab not in index:
                raise OptinError(f"--eval-data {str(held.path)!r} has label {lab!r} (at {key!r}) that --data "
                                 f"{str(data.path)!r} does not have (its labels: {', '.join(labels[:20])}); the "
                                 "held-out data must use the training data's labels")
    reader = images.ImageReader(data.path.stem or data.path.name) if data.kind != "text" else None
    if reader is not None and data.kind == "segmentation":
        reader.num_classes = len(labels)

    def example(lab: str | None, fields: dict) -> Example:
        if reader is None:
            return {**fields, "label": index[lab]}
        return images.ImageExample(reader, fields["path"], None if lab is None else index[lab], fields.get("mask"))

    train = [(key, example(lab, f)) for key, lab, f in data.rows]
    test = [example(lab, f) for _, lab, f in held.rows] if held is not None else None

    def loader(split: str) -> list[Example]:
        if test is not None:
            return [e for _, e in train] if split == "train" else list(test)
        return [e for key, e in train if split_of(key, test_fraction) == split]

    description = f"user data {data.path}" + (f", held out: {held.path}" if held is not None else "")
    eval_split = f"eval-data {held.path}" if held is not None else \
        f"hash split of {data.path} ({round(test_fraction * 100)}%)"
    segmentation = data.kind == "segmentation"
    return Task(name=data.path.stem or data.path.name, description=description, labels=labels, loader=loader,
                metric="miou" if segmentation else "accuracy", kind="text" if data.kind == "text" else "image",
                target="segmentation" if segmentation else "classes", eval_split=eval_split, images=reader)


def sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn without replacement with a fixed seed (all when n >= len)."""
    if n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, n)
