"""Atomic file writing, checksummed files, locks and leftover sweeping: a killed process never
leaves a half-written file, a damaged one is recognised as such, and two processes never do the
same piece of work at once."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _tmp_prefix(name: str) -> str:
    """Temporary names carry their owner: ``.<name>.pid<PID>.<random>.tmp``, so a later run
    can tell a killed process's leftovers from a live writer's work in progress."""
    return f".{name}.pid{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


_TMP_NAME = re.compile(r"\..+\.pid(\d+)\.[^.]+\.tmp")
_LOCK_NAME = re.compile(r"\.(.+)\.lock")


def lock_path(target: Path) -> Path:
    """The lock file guarding ``target`` (a unit, a cache entry, a state folder): a hidden
    sibling, ``.<name>.lock``, present only while someone holds it (or killed while holding)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove, in ``folder``, what processes that are gone left behind: temporary files and
    folders of a dead pid (a killed run's half-written cache entry, record or state file), lock
    files nobody holds, and empty subfolders nobody holds the lock of (a killed fine-tune's
    state folder). A live process's work in progress is left alone. Returns what was removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        m = _TMP_NAME.fullmatch(p.name)
        if m is not None:
            if not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
        elif _LOCK_NAME.fullmatch(p.name):
            fd = _acquire(p, block=False, create=False)  # None while held: its owner is alive
            if fd is not None:
                _release(p, fd)
                removed.append(p)
        elif p.is_dir() and _is_empty(p):
            lock = lock_path(p)
            fd = _acquire(lock, block=False)
            if fd is None:
                continue  # a live process owns it
            try:
                p.rmdir()  # fails if it is no longer empty
                removed.append(p)
            except OSError:
                pass
            finally:
                _release(lock, fd)
    return removed


def _is_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return next(it, None) is None
    except OSError:
        return False


# ---------------------------------------------------------------- file modes and atomic writes

_UMASK = threading.Lock()


def _umask() -> int:
    with _UMASK:  # reading the umask means setting it: keep other threads out meanwhile
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_KILL_COUNTS: dict[str, int] = {}


def _kill_point(stage: str, path: Path) -> None:
    """Test hook (docs/reliability.md): with ``SSL_EVAL_TEST_KILL_AT="<stage>:<glob>[#n]"``
    the process SIGKILLs itself the n-th time (default 1st) it reaches ``stage`` for a file whose
    name matches ``glob``. Stages: ``mid-write`` (half the bytes are in the temporary file) and
    ``after-write`` (the file is in place). Unset, it costs one dictionary look-up."""
    spec = os.environ.get("SSL_EVAL_TEST_KILL_AT")
    if not spec or not spec.startswith(stage + ":"):
        return
    pattern, _, nth = spec[len(stage) + 1 :].partition("#")
    if not fnmatch.fnmatchcase(Path(path).name, pattern):
        return
    _KILL_COUNTS[spec] = _KILL_COUNTS.get(spec, 0) + 1
    if _KILL_COUNTS[spec] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``. The file
    gets the mode the user's umask gives a new file (``mkstemp`` alone would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            view = memoryview(data)
            f.write(view[: len(view) // 2])
            f.flush()
            _kill_point("mid-write", path)
            f.write(view[len(view) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    _kill_point("after-write", path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``final`` in one step.

    If ``final`` appeared meanwhile (a concurrent run finished first) the new copy is dropped:
    both are built from the same content key, so either one is right.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final.name), suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- checksummed files

_CHECKED = b"ssl-eval checked file v1"


class DamagedFile(ValueError):
    """A file that fails its checksum, is truncated or cannot be parsed; the message says which
    (one line)."""


def write_checked(path: Path, payload: bytes) -> None:
    """Write ``payload`` atomically behind a one-line header holding its length and crc32, so
    ``read_checked`` tells a damaged or truncated file from a good one."""
    header = b"%s size=%d crc32=%08x\n" % (_CHECKED, len(payload), zlib.crc32(payload))
    atomic_write_bytes(path, header + payload)


def read_checked(path: Path, legacy: bool = False) -> bytes:
    """The payload of a file written by ``write_checked``, verified; any damage is a
    ``DamagedFile``. With ``legacy``, a file without the header (written before checksums) is
    returned whole, unverified."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DamagedFile(f"cannot be read: {e.strerror or e}") from e
    if not data.startswith(_CHECKED):
        if legacy and not data.startswith(b"ssl-eval"):
            return data
        raise DamagedFile("no ssl-eval checksum header (not a file ssl-eval wrote, or damaged)")
    head, nl, payload = data.partition(b"\n")
    m = re.fullmatch(rb"size=(\d+) crc32=([0-9a-f]{8})", head[len(_CHECKED) + 1 :])
    if not nl or m is None:
        raise DamagedFile("its checksum header is damaged")
    if len(payload) != int(m.group(1)):
        raise DamagedFile(f"truncated or extended: {len(payload)} bytes, {int(m.group(1))} written")
    if zlib.crc32(payload) != int(m.group(2), 16):
        raise DamagedFile("its content does not match its checksum")
    return payload


def write_torch_checked(path: Path, obj) -> None:
    """``obj`` through ``torch.save``, written atomically behind ``write_checked``'s header."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_checked(path, buf.getvalue())


def read_torch_checked(path: Path, map_location, legacy: bool = False):
    """What ``write_torch_checked`` wrote, verified (the checksum, then torch's own reading,
    tensors only); any damage is a ``DamagedFile``. ``legacy``: as ``read_checked``."""
    import io

    import torch

    payload = read_checked(path, legacy=legacy)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types on a damaged file (IndexError among them)
        raise DamagedFile(f"not a readable torch file ({type(e).__name__})") from e


# ---------------------------------------------------------------- locks


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(os.pread(fd, 32, 0).decode().strip())}"
    return "another process"


def _acquire(
    path: Path,
    what: str = "",
    log: Callable[[str], None] | None = None,
    block: bool = True,
    create: bool = True,
) -> int | None:
    """An ``fcntl.flock`` on ``path``: its fd, or None if not ``block`` and it is held (or, not
    ``create``, it does not exist). The holder removes the file on release, so a waiter that
    wakes on a removed file locks the new one instead (the inode check)."""
    path = Path(path)
    said = False
    while True:
        try:
            flags = os.O_RDWR | (os.O_CREAT if create else 0)
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
                continue
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not block:
                    os.close(fd)
                    return None
                if not said and log is not None:
                    log(f"waiting for {what or path}, held by {_holder(fd)}")
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
                os.close(fd)  # released and removed while we waited: lock the current file
                if not create and now is None:
                    return None
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still held: a waiter then sees another inode and retries
    os.close(fd)


def _log_wait(msg: str) -> None:
    from .runtime import log

    log(msg, "wait")


@contextlib.contextmanager
def file_lock(
    path: Path, what: str = "", log: Callable[[str], None] | None = _log_wait
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, removed on release). A process that waits
    says so once, naming ``what`` and the holder's pid. The kernel drops the lock of a killed
    holder, so a waiter never waits on a dead process."""
    fd = _acquire(Path(path), what, log)
    try:
        yield
    finally:
        _release(Path(path), fd)


def claim_each(
    items: Iterable[T],
    lock: Callable[[T], tuple[Path, str]],
    done: Callable[[T], bool],
) -> Iterator[tuple[T, bool]]:
    """Each item with its lock held while the caller works on it: ``(item, True)``; or
    ``(item, False)`` when, the lock once held, ``done(item)`` says another process finished it
    meanwhile (the caller then skips it). ``lock(item)`` gives the lock file and what it guards
    (for the waiting message). The lock is released when the caller asks for the next item."""
    for item in items:
        path, what = lock(item)
        with file_lock(path, what):
            yield item, not done(item)


def lock_held(path: Path) -> bool:
    """Whether a live process holds the lock ``path`` (read-only look: never creates, takes or
    removes it; a lock file a killed holder left is not held)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock, if it was taken
    return False


# ---------------------------------------------------------------- hashing and folders


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and prove it takes a file, before any work is done; otherwise a
    one-line UserError naming ``what`` (a results folder that is a file, read-only, ...)."""
    from .errors import UserError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} {path} is a file, not a folder; name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"cannot write to the {what} {path} ({e.strerror or e}); "
            "make it writable or choose another folder"
        ) from e
    return path


def preallocate(path: Path, size: int) -> None:
    """Reserve ``size`` bytes for ``path`` now, so a full disk is an OSError here rather than a
    SIGBUS later, when a memory-mapped write finds no block behind a page."""
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
