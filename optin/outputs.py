"""Output folders that never lose a run: locked, staged, published at the end.

A run writes its outputs (``scores.safetensors``, ``model/``, ``report.json``) into a private staging folder
beside ``--output`` and moves them into place only when everything succeeded, ``report.json`` last, so an
interrupted or failed run changes nothing there (its only trace is the resumable
``scores.partial.safetensors``). Outputs of a previous run are never replaced unless the caller says so
(``overwrite``; the CLI's ``--overwrite``), and a lock refuses a second run on the same folder while one is
in progress (the operating system releases it when a process dies, even by SIGKILL).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from .errors import OptinError

REPORT = "report.json"
SCORES = "scores.safetensors"
MODEL = "model"
PARTIAL = "scores.partial.safetensors"
# Written in this order when published: report.json last, so its presence means a complete run.
ORDER = (SCORES, MODEL, REPORT)


def lock_path(folder: Path) -> Path:
    """The lock file of an output folder: in the temporary directory (nothing is written beside the outputs),
    named after the folder's absolute path."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    where = Path(tempfile.gettempdir()) / f"optin-locks-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    where.mkdir(mode=0o700, exist_ok=True)
    return where / f"{key}.lock"


class OutputFolder:
    """``with OutputFolder(path, writes) as staging:`` write the outputs named in ``writes`` into ``staging``;
    they replace nothing in ``path`` until the block ends without an exception.

    On entry: ``path`` must be creatable (not under a file, not read-only), no other run may hold it, and
    none of ``writes`` may exist there unless ``overwrite``. ``partial`` is where a resumable checkpoint goes
    (inside ``path``: it survives an interrupted run)."""

    def __init__(self, path: str | os.PathLike, writes: tuple[str, ...] = ORDER, overwrite: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.writes = tuple(w for w in ORDER if w in writes) + tuple(w for w in writes if w not in ORDER)
        self.overwrite = overwrite
        self.partial = self.path / PARTIAL
        self.staging: Path | None = None
        self._lock: FileLock | None = None

    # --- entering: checks, lock, staging ----------------------------------------------------------
    def __enter__(self) -> Path:
        where = f"output folder {str(self.path)!r}"
        if self.path.exists() and not self.path.is_dir():
            raise OptinError(f"{where} is a file; choose another --output")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise OptinError(f"cannot create {where}: a part of its path is a file; choose another --output") from None
        except OSError as exc:
            raise OptinError(f"cannot create {where}: {exc.strerror or exc}; choose a writable --output") from None
        self._lock = FileLock(str(lock_path(self.path)), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            raise OptinError(f"{where} is in use by another optin run that has not finished; wait for it, or "
                             "choose another --output") from None
        try:
            self._check_previous(where)
            self._clean_stale()
            try:
                self.staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.staging-", dir=self.path.parent))
            except OSError as exc:
                raise OptinError(f"cannot write into {str(self.path.parent)!r}: {exc.strerror or exc}; choose a "
                                 "writable --output") from None
        except BaseException:
            self._release()
            raise
        return self.staging

    def _check_previous(self, where: str) -> None:
        present = [w for w in self.writes if (self.path / w).exists()]
        if present and not self.overwrite:
            shown = ", ".join(w + ("/" if w == MODEL else "") for w in present)
            raise OptinError(f"{where} already holds the outputs of a previous run ({shown}); pass --overwrite to "
                             "replace them, or choose another --output")
        if not os.access(self.path if self.path.exists() else self.path.parent, os.W_OK):
            raise OptinError(f"{where} is not writable; choose a writable --output")

    def _clean_stale(self) -> None:
        """Leftovers of a run killed while staging or publishing (we hold the lock: no live run owns them):
        staging folders are deleted, previous outputs put back where nothing replaced them."""
        for old in self.path.parent.glob(f".{self.path.name}.previous-*"):
            _restore(old, self.path)
        for old in self.path.parent.glob(f".{self.path.name}.staging-*"):
            shutil.rmtree(old, ignore_errors=True)

    # --- leaving: publish or discard ----------------------------------------------------------------
    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.publish()
        finally:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            self._release()

    def publish(self) -> None:
        """Move the staged outputs into ``path`` (report.json last); previous outputs they replace are moved
        aside first and deleted once every new one is in place."""
        assert self.staging is not None
        self.path.mkdir(parents=True, exist_ok=True)
        staged = [w for w in self.writes if (self.staging / w).exists()]
        staged += sorted(p.name for p in self.staging.iterdir() if p.name not in staged)
        previous = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.previous-", dir=self.path.parent))
        try:
            for name in staged:
                if (self.path / name).exists():
                    os.replace(self.path / name, previous / name)
            for name in staged:
                os.replace(self.staging / name, self.path / name)
        except BaseException:
            _restore(previous, self.path)  # the previous outputs go back where no new one arrived
            raise
        shutil.rmtree(previous, ignore_errors=True)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _restore(previous: Path, folder: Path) -> None:
    """Move the outputs set aside in ``previous`` back into ``folder`` where it lacks them; drop the rest."""
    for item in list(previous.iterdir()) if previous.is_dir() else []:
        if not (folder / item.name).exists():
            os.replace(item, folder / item.name)
    shutil.rmtree(previous, ignore_errors=True)
