"""Output files and folders: checked before any work, written whole or not at all.

Every file memprof writes (``--json``, ``--html``, ``--write-recipe``, a
baseline, a JUnit report, a snapshot) goes through :func:`write_atomic`: a
temporary file in the same folder, flushed to disk, then one ``os.replace``, so
a reader (or a run killed half-way) sees the old content or the new, never
half. The commands check every output path with :func:`check_output_file`
(:func:`check_output_folder` for ``apply``'s folder) before they start, so a
path that cannot be written costs nothing but one line.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from memprof.errors import EnvironmentProblem, InputError, MemprofError

#: errno values that say "this path cannot be written here" (the user's to fix); others
#: (a full disk, an I/O error) are the machine's
_PATH_ERRORS = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.EEXIST,
    errno.EINVAL,
}


def write_error(path: str | Path, e: OSError) -> MemprofError:
    """The typed error of a failed write of ``path``: InputError for the path, EnvironmentProblem for the machine."""
    cls = InputError if e.errno in _PATH_ERRORS else EnvironmentProblem
    return cls(f"cannot write {path}: {e.strerror or e}")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, what: str) -> None:
    """The folder that will hold ``path`` (or its nearest existing ancestor, created later) takes a new file."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise InputError(f"{what}: {base} is a file, not a folder")
    try:  # a real probe: os.access says yes to root even where nothing can be created (/proc)
        fd, probe = tempfile.mkstemp(prefix=".memprof-probe-", dir=base)
    except OSError as e:
        raise InputError(f"{what}: cannot write in {base}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def is_stream(path: Path) -> bool:
    """An existing device or pipe (``/dev/null``, ``/dev/stdout``): written in place, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def check_output_file(path: str | Path | None, flag: str, *, force: bool = False) -> None:
    """Refuse an output file that cannot be written, before any work rather than after it.

    ``None`` and ``-`` (stdout) pass. A device or pipe (``/dev/null``) is written
    in place and needs no ``--force``.

    Args:
        path: the option's value.
        flag: the option, for the message (``--json``).
        force: an existing file may be replaced.

    Raises:
        InputError: a folder; an existing file without ``force``; a parent that is
            a file or a folder where no file can be created.
    """
    if path is None or str(path) == "-":
        return
    p = Path(path).expanduser()
    what = f"{flag} {path}"
    if p.is_dir():
        raise InputError(f"{what}: is a directory; give a file name")
    if is_stream(p):
        if not os.access(p, os.W_OK):
            raise InputError(f"{what}: not writable")
        return
    if p.exists() and not force:
        raise InputError(f"{what}: already exists; pass --force to replace it")
    _check_parent(Path(os.path.realpath(p)), what)


def check_output_folder(path: str | Path, flag: str, *, force: bool = False) -> None:
    """Refuse an output folder that cannot be written (``apply -o``), before any work.

    Raises:
        InputError: an existing file; an existing folder without ``force``; a parent
            that is a file or a folder where nothing can be created.
    """
    p = Path(path).expanduser()
    what = f"{flag} {path}"
    if p.exists() and not p.is_dir():
        raise InputError(f"{what}: exists and is not a folder")
    if p.exists() and not force:
        raise InputError(f"{what}: already exists; pass --force to replace it")
    _check_parent(p.resolve(), what)


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never half.

    A temporary file in the same folder (created if missing), flushed to disk,
    then one ``os.replace``; a link is followed (its target is replaced), and a
    device or pipe (``/dev/null``) is written in place. On any failure, including
    an interrupt, the temporary file is removed and the old file is untouched.

    Raises:
        OSError: the file cannot be written (see :func:`write_error`).
    """
    if not text.endswith("\n"):
        text += "\n"
    path = Path(path)
    if is_stream(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the content is on disk before the name points at it
        # mkstemp makes a private file: give it a normal file's permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def leftovers(out: Path) -> list[Path]:
    """The temporary folders of killed ``apply`` runs beside ``out`` (``.NAME.memprof-*``).

    :func:`memprof.apply.recover` repairs them; the command line looks for them
    first (here, without torch) to know whether the library's check of ``out``
    can be made before it loads.

    A folder whose process is still running (another ``apply`` to the same
    ``out``) is not a leftover.
    """
    prefix = f".{out.name}.memprof-"
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        found.append(out.parent / name)
    return found
