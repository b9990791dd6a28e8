"""Writing files without ever leaving a half-written one (write a temporary sibling, then rename),
and checking output paths before any work starts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from bridge.errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give a finished output the permissions an ordinary
    ``open``/``mkdir`` would (0666/0777 less the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def interrupts_deferred():
    """A Ctrl-C inside is held until the block ends, then delivered: a temporary entry is never
    created without its name being known to the code that removes it (a SIGINT landing inside
    ``mkdtemp`` left one behind under load). Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        if callable(old):
            old(signal.SIGINT, None)
        raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with interrupts_deferred():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        normal_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_directory(dst: Path):
    """A temporary sibling directory to fill; ``commit()`` renames it to ``dst``, else it is removed."""
    dst = Path(dst)

    class _Tmp:
        def __enter__(self):
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.path = None
            try:
                with interrupts_deferred():
                    self.path = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
                return self
            except BaseException:  # __exit__ is not called when __enter__ raises
                self.__exit__()
                raise

        def commit(self):
            normal_mode(self.path, directory=True)  # mkdtemp's 0700 would hide it from other users
            for f in self.path.iterdir():
                normal_mode(f)
            os.replace(self.path, dst) if not dst.exists() else shutil.rmtree(self.path)

        def __exit__(self, *exc):
            if self.path is not None and self.path.exists():
                with interrupts_deferred():
                    shutil.rmtree(self.path, ignore_errors=True)

    return _Tmp()


def _writable_dir(d: Path) -> str | None:
    """Why nothing can be created in the existing directory ``d`` (None if it can). Tries it for
    real: permission bits say nothing when running as root or on a read-only mount."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".torchax-bridge-probe.", dir=d)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


def check_output(path, flag: str, *, kind: str = "file", may_exist: bool = False, error=UsageError) -> Path:
    """Checks, before any work, that ``path`` can be created: it does not exist yet (unless
    ``may_exist``; a file where a directory is wanted, or the reverse, never passes) and its
    nearest existing ancestor is a writable directory. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists():
        is_dir = path.is_dir()
        if kind == "dir" and not is_dir:
            raise error(f"{flag} {path} is a file, not a directory; pick a directory path")
        if kind == "file" and is_dir:
            raise error(f"{flag} {path} is a directory; give a file path")
        if not may_exist:
            raise error(f"{flag} {path} already exists; remove it or pick another path")
        probe_in = path if is_dir else path.parent
    else:
        probe_in = path.parent
        while not probe_in.exists():
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            raise error(f"{flag} {path}: {probe_in} is a file, so nothing can be created under it; pick another path")
    why = _writable_dir(probe_in)
    if why:
        raise error(f"{flag} {path} cannot be written ({probe_in}: {why}); pick a writable path")
    return path
