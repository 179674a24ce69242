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
from collections.abc import Collection, Mapping
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


def dangling_link(path: str | Path) -> str | None:
    """Why writing ``path`` would create folders the user did not name, else None.

    A link whose target's folder is missing (``out -> /nonexistent/x``), or a
    folder on the way that is a link to nothing: following it, :func:`write_atomic`
    would create folders wherever the link points.
    """
    p = Path(os.path.abspath(Path(path).expanduser()))
    if os.path.islink(p) and not os.path.isdir(os.path.dirname(os.path.realpath(p))):
        return f"is a link to {os.readlink(p)}, whose folder does not exist"
    for a in p.parents:
        if os.path.exists(a):  # a link to an existing folder included: nothing above it is created
            break
        if os.path.islink(a):
            return f"{a} is a link to {os.readlink(a)}, which does not exist"
    return None


def not_regular(path: str | Path) -> str | None:
    """What an existing path is when it is not a regular file (``a named pipe (FIFO)``), else None.

    For an input's message: ``/dev/null`` or a FIFO is neither missing nor a folder.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    for test, kind in (
        (stat.S_ISREG, None),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def is_stream(path: Path) -> bool:
    """An existing device or pipe (``/dev/null``, ``/dev/stdout``): written in place, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def check_output_file(
    path: str | Path | None, flag: str, *, force: bool = False, stream: bool = True
) -> None:
    """Refuse an output file that cannot be written, before any work rather than after it.

    ``None`` and ``-`` (stdout) pass. A device or pipe (``/dev/null``) is written
    in place and needs no ``--force``.

    Args:
        path: the option's value.
        flag: the option, for the message (``--json``).
        force: an existing file may be replaced.
        stream: ``-`` means stdout; False for a file that cannot be a stream (a
            pickle), where ``-`` is refused rather than written as a file named ``-``.

    Raises:
        InputError: a folder; an existing file without ``force``; a parent that is
            a file or a folder where no file can be created; a link to a missing
            folder; ``-`` where ``stream`` is False.
    """
    if path is None:
        return
    if str(path) == "-":
        if not stream:
            raise InputError(f"{flag} -: cannot go to stdout; give a file name")
        return
    p = Path(path).expanduser()
    what = f"{flag} {path}"
    if str(path) == "":
        raise InputError(f"{flag}: an empty file name; give a file name")
    why = dangling_link(p)
    if why:
        raise InputError(f"{what}: {why}; fix the link or give another file name")
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
        InputError: ``-`` or an empty name; an existing file; an existing folder
            without ``force``; a parent that is a file or a folder where nothing can
            be created; a link to a missing folder.
    """
    if str(path) == "":
        raise InputError(f"{flag}: an empty folder name; give a folder name")
    if str(path) == "-":
        raise InputError(f"{flag} -: a folder cannot go to stdout; give a folder name")
    p = Path(path).expanduser()
    what = f"{flag} {path}"
    why = dangling_link(p)
    if why:
        raise InputError(f"{what}: {why}; fix the link or give another folder name")
    if p.exists() and not p.is_dir():
        raise InputError(f"{what}: exists and is not a folder")
    if p.exists() and not force:
        raise InputError(f"{what}: already exists; pass --force to replace it")
    _check_parent(p.resolve(), what)


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _same(a: Path, b: Path) -> bool:
    """One file (a link or a hard link to it included)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs_apart(
    outputs: Mapping[str, str | Path | None],
    inputs: Mapping[str, str | Path | None],
    *,
    folders: Collection[str] = (),
) -> None:
    """Refuse an output that would replace or delete what the command reads, whatever ``--force`` says.

    An output file that is an input file (through links too), or an existing file
    of an input folder; an output folder (replaced whole) that holds an input or
    lies inside an input folder; an output file inside an output folder (written
    over by it). Checked before any work, after :func:`check_output_file`.

    Args:
        outputs: option -> path (``--json`` -> ``out.json``); ``None``, ``-`` and
            devices (``/dev/null``) pass.
        inputs: what the command reads, in words, -> path (``the recipe (--recipe)``
            -> ``r.yaml``); ``None`` and paths that do not exist pass.
        folders: the options of ``outputs`` that name a folder (``apply --output``).

    Raises:
        InputError: the first such output, with the input it would clobber.
    """
    given = {f: p for f, p in outputs.items() if p is not None and str(p) not in ("-", "")}
    read = {w: _real(p) for w, p in inputs.items() if p is not None and str(p) != "" and os.path.exists(p)}
    for flag, path in given.items():
        out = _real(path)
        if is_stream(out):
            continue
        what = f"{flag} {path}"
        for name, inp in read.items():
            if flag in folders:
                if _same(out, inp) or out in inp.parents:
                    raise InputError(
                        f"{what}: holds {name} this command reads ({inp}); choose another folder"
                    )
                if inp.is_dir() and inp in out.parents:
                    raise InputError(f"{what}: is inside {name} this command reads; choose another folder")
            elif inp.is_dir():
                if inp in out.parents and os.path.lexists(out):
                    raise InputError(f"{what}: is a file of {name} this command reads; write elsewhere")
            elif _same(out, inp):
                raise InputError(f"{what}: is {name} this command reads; write elsewhere")
        for folder in folders:
            if flag in folders or folder not in given:
                continue
            d = _real(given[folder])
            if out == d or d in out.parents:
                raise InputError(
                    f"{what}: is inside {folder} {given[folder]}, which this command writes whole; "
                    "write it elsewhere"
                )


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write a file (text, or bytes: a pickle) so that readers see the old content or the new, never half.

    A temporary file in the same folder (created if missing), flushed to disk,
    then one ``os.replace``; a link is followed (its target is replaced; a link
    to a missing folder is refused, never a folder made where it points), and a
    device or pipe (``/dev/null``) is written in place. On any failure, including
    an interrupt, the temporary file is removed and the old file is untouched.

    Raises:
        OSError: the file cannot be written (see :func:`write_error`).
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    if isinstance(text, str) and not text.endswith("\n"):
        data += b"\n"  # a text file ends its last line
    path = Path(path)
    if is_stream(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    why = dangling_link(path)
    if why:  # never create folders where a link points, outside what the user named
        raise FileNotFoundError(errno.ENOENT, why)
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
