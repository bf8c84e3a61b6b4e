"""Writing files safely, in one place: every file a run writes (checkpoints, metrics.csv, plots, the case
log, caches) goes through `atomic_write` or `write_text`, so that a crash leaves the old file or the new one,
never a torn one, and a failed write (a full disk, a quota, a file-size limit) becomes one `WriteError`
line naming the file and the operating system's reason."""

from __future__ import annotations

import os
import shutil
import tempfile

from .config import EXIT_WRITE, UserError


class WriteError(UserError):
    """A file could not be written. The run that meets it adds which checkpoint is intact."""

    def __init__(self, path: str, error: OSError):
        self.path = path
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(f"cannot write {show(path)}: {reason}", EXIT_WRITE)


def show(path: str) -> str:
    """A path as the user can read and paste it, also when its name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_new_path(path: str, command: str, flag: str = "--out") -> None:
    """Refuse an output path that exists (a command never writes over a file or folder of the user's) or
    whose folder does not."""
    if os.path.lexists(path):
        raise UserError(f"{flag} {show(path)}: already exists; xception {command} never writes over it, choose "
                        f"another path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {show(path)}: folder {show(folder)} does not exist")


def make_folder(path: str, flag: str) -> None:
    """Create the folder `flag` names (and its parents) if needed; refuse one that cannot be written to."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {show(path)}: cannot create it ({e.strerror})")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {show(path)}: not writable; choose a folder you can write to")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """Call write(f) on a temporary file beside `path`, fsync, then rename it over `path`. Any OSError
    (or error of a writer that wraps one, such as torch's zip writer) is a WriteError naming `path`; the
    temporary file is removed and `path` keeps its previous content."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise WriteError(path, e) from None
    except RuntimeError as e:
        if not isinstance(e.__context__, OSError):
            raise  # not a failed write: a bug deserves its traceback
        # torch.save's zip writer meets the OSError (e.g. EFBIG), then fails with a RuntimeError of its own
        raise WriteError(path, e.__context__) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(folder)


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def copy_atomic(src: str, dst: str) -> None:
    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)
    atomic_write(dst, write)
