"""Per-output locks: two runs on one cohort never write the same slide's file at once.

Why ``flock`` on a lock file beside the output (``.<name>.lock``): the kernel
drops the lock when its holder dies — SIGKILL, OOM, a node reboot on NFSv4 —
so a stale lock never blocks a cohort; the file's text (pid, host, start time)
only says *who* holds it, and is cleared by the next run that gets the lock.
While a run holds a slide's lock it also removes the slide's half-written
temp files (``.<name>.*.tmp``) left by a killed writer: nobody else can be
writing them.

Two kinds: :func:`file_lock` (a plain mutual exclusion: the registry's
promotion, the SQLite stores, metrics.json, tuning) is ``filelock``'s; the
per-slide :func:`claim` keeps its own non-blocking ``flock`` because it must
also say who holds a busy slide (the holder's pid and host, read from the lock
file) and let a run skip to the next slide instead of waiting.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from filelock import FileLock

from fbta.config import InputError

T = TypeVar("T")


class Busy(Exception):
    """Another live process holds the lock."""

    def __init__(self, lock: Path, holder: str) -> None:
        super().__init__(f"{lock}: held by {holder}")
        self.lock, self.holder = lock, holder


def lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    return f"pid {info['pid']} on {info['host']}" if {"pid", "host"} <= info.keys() else ""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing, kept afterwards); blocks until free, across processes.

    ``filelock`` (an ``flock`` underneath: the kernel drops it when the holder dies). The lock file is
    kept (``preserve_lock_file``): unlinking it on release would let a waiter lock an inode nobody else
    opens again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), preserve_lock_file=True, thread_local=False):
        yield


@contextlib.contextmanager
def claim(dest: Path, wait: bool = False) -> Iterator[Optional[str]]:
    """Hold ``dest``'s lock for the ``with`` body; yields the dead holder it replaced (or None).

    ``wait=False`` raises :class:`Busy` at once if a live process holds it.
    """
    lock = lock_path(Path(dest))
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            os.close(fd)
            raise Busy(lock, holder) from None
        try:  # the holder we waited for unlinks the file on release: lock the file that is there now
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stale = _holder(fd) or None  # text left behind means its writer died holding the lock
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        for tmp in dest.parent.glob(f".{dest.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
        yield stale
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def claimed(items: Iterable[T], dest_of: Callable[[T], Path], is_done: Callable[[T], bool],
            on_skip: Callable[[T, str], None], log: Callable[[str], None] = print) -> Iterator[T]:
    """Yield each item while holding its output's lock; items another run holds come last.

    Why wait for them at the end rather than skip: a run that exits 0 has every
    slide's output — finished by this run or by the other one — or, if the
    other run dies meanwhile, finishes them itself.
    """
    busy: list[T] = []
    for source, wait_list in ((items, busy), (busy, None)):
        for item, release in claimed_ahead(source, dest_of, is_done, on_skip, log, busy=wait_list):
            try:
                yield item
            finally:
                release()


def claimed_ahead(items: Iterable[T], dest_of: Callable[[T], Path], is_done: Callable[[T], bool],
                  on_skip: Callable[[T, str], None], log: Callable[[str], None] = print,
                  busy: Optional[list[T]] = None) -> Iterator[tuple[T, Callable[[], None]]]:
    """Like :func:`claimed`, but each lock is held until the caller calls the ``release`` it is given.

    Why: a pipelined consumer (extraction with persistent loader workers) claims
    the next slide while the last one's batches are still in flight; its lock must
    stay held until that slide's file is written, not until the next claim.
    With ``busy`` (a list), items another run holds are put there instead of
    waited for: the caller waits for them (``busy=None``) only once it holds no
    lock, so two runs can never wait for each other.
    """
    for item in items:
        try:
            cm = claim(dest_of(item), wait=busy is None)
            stale = cm.__enter__()
        except Busy as b:
            if busy is not None:
                busy.append(item)
                log(f"{dest_of(item).name}: {b.holder} is writing it; this run will wait for it at the end")
            continue
        if stale:
            log(f"cleared a stale lock on {dest_of(item).name} (left by {stale}, no longer running)")
        release = functools.partial(cm.__exit__, None, None, None)
        if is_done(item):
            release()
            on_skip(item, "up to date (finished by another run)" if busy is not None else
                    "up to date (written by another run while this run waited)")
            continue
        yield item, release


# -- storage errors -------------------------------------------------------------------------------------------

_FATAL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
          errno.EFBIG: "file size limit reached", errno.EROFS: "read-only file system",
          errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


class StorageError(InputError):
    """The output location cannot take more data: the stage stops; finished outputs stay as they are."""


def storage_problem(exc: BaseException) -> Optional[str]:
    """What is wrong with the disk, if ``exc`` says so (h5py folds errno into its message text)."""
    if isinstance(exc, OSError) and exc.errno in _FATAL:
        return _FATAL[exc.errno]
    text = str(exc)
    for code, why in _FATAL.items():
        if f"errno = {code}," in text or os.strerror(code) in text:
            return why
    return None


def raise_if_storage(exc: BaseException, dest: Path, stage: Optional[str] = None) -> None:
    """Turn a full/read-only/forbidden output location into one clear, stage-stopping error.

    Why stop instead of failing slide after slide: every later write would
    fail the same way, and the user must act (free space, fix permissions).
    """
    why = storage_problem(exc)
    if why is not None:
        rerun = f"`fbta {stage}`" if stage else "the stage"
        raise StorageError(f"cannot write {dest}: {why}; outputs already finished are intact — "
                           f"fix the location (or set data.out elsewhere) and re-run {rerun} "
                           "(finished slides are skipped)") from None
