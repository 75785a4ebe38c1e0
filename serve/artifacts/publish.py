"""How a folder lands on disk: written in a staging folder beside its target, fsynced, renamed into place.

Every command that writes a folder (the default model's conversion, `llm-export`, `llm-eval`,
`llm-train`) goes through here, so a kill at any moment leaves the target either as it was or complete:

    with staged_dir(out) as tmp:      # .OUT.tmp-XXXXXXXX beside OUT, owned by this process
        write_everything_into(tmp)
        publish_dir(tmp, out)         # OUT now holds it; an old OUT is swapped out and removed

A staging folder is owned through an `flock` on the folder itself, held while the staging exists; the
kernel drops it when its process dies, even by `kill -9`. So `clean_stale(out)`, which `staged_dir`
runs first, removes exactly the stagings of runs that are gone (also those of older llm-serve versions,
which took no lock) and never the folder of a run that is still writing. `lock_dir` gives the same
ownership to a folder that outlives its process on purpose (llm-train's resumable `.NAME.partial`).

`publish_dir` makes files and folders ordinary (0644/0755 under the usual umask: `mkdtemp` makes
0700 and some writers 0600, which another user or service could not read), fsyncs them, then swaps
the staging in with one `renameat2(RENAME_EXCHANGE)` where the filesystem has it (two renames else).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serve.cli_runner import UserError

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class FolderBusyError(UserError):
    """Another live process is writing this folder."""


def _stale_name(target: Path) -> re.Pattern[str]:
    # Ours (.NAME.tmp-*), the swap-outs of older versions (.NAME.old, .NAME.old-PID) and the bare
    # mkdtemp stagings older versions left (.NAME.xxxxxxxx); never .NAME.partial or NAME.rejected.
    return re.compile(rf"^\.{re.escape(target.name)}\.(tmp-.+|old(-\d+)?|[a-z0-9_]{{8}})$")


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on directory `path`, or None if a live process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders beside `target` that no live process owns; returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = _stale_name(target)
    removed = []
    for path in sorted(target.parent.iterdir()):
        if not pattern.match(path.name) or path.is_symlink() or not path.is_dir():
            continue
        fd = _try_lock(path)
        if fd is None:
            continue  # a live run is writing it
        try:
            # Hold the lock until the folder is gone, so a run creating a staging never gets this one.
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        logger.warning("removed %s, left by a run that no longer exists", path)
        removed.append(path)
    return removed


class Staging:
    """A staging folder beside `target` and the lock that marks it as owned by this process."""

    def __init__(self, target: Path, kind: str = "tmp"):
        self.target = target
        for _ in range(100):
            path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
            fd = _try_lock(path)  # None: a cleaner took it between mkdtemp and here; make another
            if fd is not None:
                break
        else:  # pragma: no cover - would need a cleaner winning a hundred races in a row
            raise OSError(f"could not create a staging folder beside {target}")
        os.chmod(path, ordinary_mode(is_dir=True))
        self.path, self._fd = path, fd

    def close(self) -> None:
        """Remove what is left at the staging path (nothing after a publish) and release the lock."""
        if self._fd is None:
            return
        if self.path.exists() and not self.path.is_symlink():
            shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)
        self._fd = None


@contextmanager
def staged_dir(target: str | os.PathLike, kind: str = "tmp") -> Iterator[Path]:
    """A fresh owned staging folder beside `target`; removed on exit unless it was published."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    staging = Staging(target, kind)
    try:
        yield staging.path
    finally:
        staging.close()


def publish_dir(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make `src` ordinary and durable, then put it at `target` in one step (an old `target` is removed)."""
    src, target = Path(src), Path(target)
    _normalize_and_fsync(src)
    if target.exists() or target.is_symlink():
        if _exchange(src, target):
            _fsync_dir(target.parent)
            _remove(src)  # src now holds the old target
            return
        old = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
        os.replace(target, old)
        os.replace(src, target)
        _fsync_dir(target.parent)
        _remove(old)
        return
    os.replace(src, target)
    _fsync_dir(target.parent)


@contextmanager
def lock_dir(path: str | os.PathLike, what: str = "run") -> Iterator[None]:
    """Own an existing folder for the block; raises FolderBusyError if a live process owns it."""
    fd = lock_fd(path, what)
    try:
        yield
    finally:
        os.close(fd)


def lock_fd(path: str | os.PathLike, what: str = "run") -> int:
    """Like `lock_dir` but returns the fd (the caller closes it; a child process may inherit it)."""
    fd = _try_lock(Path(path))
    if fd is None:
        raise FolderBusyError(
            f"another {what} is writing {path} right now; wait for it to finish or stop it first"
        )
    return fd


def ordinary_mode(*, is_dir: bool, executable: bool = False) -> int:
    """0755 for folders and executables, 0644 for files, under this process's umask."""
    umask = _umask()
    return (0o777 if is_dir or executable else 0o666) & ~umask


def _umask() -> int:
    try:  # Linux >= 4.7 shows it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normalize_and_fsync(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            os.chmod(path, ordinary_mode(is_dir=False, executable=bool(st.st_mode & stat.S_IXUSR)))
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirnames:
            if not (Path(dirpath) / name).is_symlink():
                os.chmod(Path(dirpath) / name, ordinary_mode(is_dir=True))
        _fsync_dir(Path(dirpath))
    os.chmod(root, ordinary_mode(is_dir=True))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or filesystem lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
