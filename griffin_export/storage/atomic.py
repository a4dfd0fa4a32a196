"""Atomic output directories: written beside the target, fsynced, and renamed into place only
when complete; removed again on an error, ``KeyboardInterrupt`` or SIGTERM, and cleaned up after
runs that were killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from griffin_export.errors import OutputError

_TMP_MARK = ".griffin-tmp-"


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; rename it to ``target`` on success.

    An existing ``target`` is refused unless ``force``; with ``force`` it survives until the
    new directory is complete, and is then swapped out in one atomic ``renameat2`` exchange
    where the OS offers it (two renames otherwise). Before the rename every file and
    directory written is fsynced, and the parent directory after it, so a crash never leaves
    ``target`` naming files whose data is not on disk. On any error, ``KeyboardInterrupt`` or
    SIGTERM the temporary directory (and any parent directory created for it) is removed.
    Temporaries left by killed runs (SIGKILL; their process gone) are removed by the next
    run that writes the same target; an old export caught between two renames is restored.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if target.exists() and not force:
        raise OutputError(f"'{target}' already exists; pass --force to replace it or choose --out")
    if target.exists() and not target.is_dir():
        raise OutputError(f"'{target}' exists and is not a directory; choose another --out")
    created = _missing_ancestors(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(
            f"cannot create '{parent}': {exc.strerror}; choose another --out"
        ) from exc
    _remove_stale_temporaries(parent, target.name)
    tmp = parent / f".{target.name}{_TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(
            f"cannot write in '{parent}': {exc.strerror}; choose another --out"
        ) from exc
    try:
        with _abort_on_signals() as check_signals:
            yield tmp
            check_signals()
            _sync_tree(tmp)
            _commit(tmp, target)
            _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


_OLD_MARK = ".griffin-old-"


def _sync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then each directory (deepest first) and the
    directory's parent, so that after the rename a crash cannot leave the new name pointing
    at files whose data never reached the disk."""
    folders = [directory]
    for root, dirs, files in os.walk(directory):
        for name in files:
            _fsync_path(Path(root) / name)
        folders.extend(Path(root) / d for d in dirs)
    for folder in reversed(folders):
        _fsync_path(folder)
    _fsync_path(directory.parent if str(directory.parent) else Path("."))


def _fsync_path(path: Path) -> None:
    """fsync one file or directory (directories: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * path.is_dir())
    except OSError:
        return  # e.g. directories cannot be opened on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data was still written
    finally:
        os.close(fd)


def _commit(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` under the name ``target``."""
    try:
        if not target.exists():
            os.replace(tmp, target)
            return
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the old export
            return
        old = target.parent / f".{target.name}{_OLD_MARK}{os.getpid()}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise OutputError(
            f"cannot rename the finished export to '{target}': {exc.strerror or exc}; "
            "choose another --out"
        ) from exc


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def _abort_on_signals() -> Iterator[Callable[[], None]]:
    """While writing, make SIGINT and SIGTERM abort the write so that cleanup runs.

    The handlers raise at once (``KeyboardInterrupt``, ``SystemExit(128 + signum)``), and also
    remember the signal: Python can lose an exception raised while a finaliser runs, so the
    yielded ``check()`` re-raises before the finished directory is renamed into place. Main
    thread only, and only for signals whose handler is still Python's default.
    """
    received: list[int] = []

    def check() -> None:
        if received:
            raise_for(received[0])

    def raise_for(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        raise_for(signum)

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    installed = []
    if threading.current_thread() is threading.main_thread():
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                signal.signal(signum, handler)
                installed.append((signum, default))
    try:
        yield check
    finally:
        for signum, default in installed:
            signal.signal(signum, default)


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing: list[Path] = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            return


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Remove what killed runs left beside ``parent/name``; restore a displaced old export."""
    for mark in (_TMP_MARK, _OLD_MARK):
        prefix = f".{name}{mark}"
        for leftover in sorted(p for p in parent.iterdir() if p.name.startswith(prefix)):
            pid = leftover.name[len(prefix) :]
            if not pid.isdigit() or _process_alive(int(pid)):
                continue
            target = parent / name
            if mark == _OLD_MARK and not target.exists():
                with contextlib.suppress(OSError):  # killed between the two renames
                    os.replace(leftover, target)
                continue
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover with our own pid is from an earlier process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
