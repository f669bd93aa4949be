"""Publishing files and folders: written whole under a temporary name, renamed into place, readable as the umask says.

``tempfile`` creates files 0600 and folders 0700 whatever the umask (it must: the name is guessable until the
rename). Outputs renamed from there would keep those modes, so an engines folder built by root could not be read
by a service user; :func:`publish_mode` gives them the modes an ordinary ``open``/``mkdir`` would have.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from sparse_context.runtime.errors import InputError, bad_value

_UMASK: list[int] = []
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read once: reading it means setting it, so it is not done on every write)."""
    with _UMASK_LOCK:
        if not _UMASK:
            mask = os.umask(0o022)
            os.umask(mask)
            _UMASK.append(mask)
        return _UMASK[0]


def publish_mode(path: str | os.PathLike) -> None:
    """Give a file 0666 and a folder (with everything inside it) 0777, both less the umask."""
    path = Path(path)
    mask = current_umask()
    if path.is_dir():
        for root, folders, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(Path(root) / name, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write via a temp file in the same folder and ``os.replace``: readers see the old file or the new one,
    never half of one (same folder, because a rename across file systems is a copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        publish_mode(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def replace_folder(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a complete ``staging`` folder to ``final``. A folder already there (one that failed its check) is
    renamed aside first and removed after, so a reader sees the old folder whole, then for a moment none, then the
    new one whole: never a folder half removed. POSIX cannot rename a folder over a non-empty one in one step.
    The folder gets the modes the umask gives (:func:`publish_mode`) first: ``mkdtemp`` made it 0700."""
    staging, final = Path(staging), Path(final)
    publish_mode(staging)
    aside = None
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".replaced-{final.name}-", dir=final.parent))
        os.replace(final, aside / final.name)
    try:
        os.replace(staging, final)
    except BaseException:
        if aside is not None:  # put the old folder back: no worse than before the call
            os.replace(aside / final.name, final)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


NAME_MAX = 255  # bytes in one file or folder name on Linux, macOS and Windows file systems


def nearest_existing(path: str | os.PathLike, what: str, flag: str) -> Path:
    """The deepest existing folder (or file) on ``path``, ``.`` if none: where an output would be created. A name
    longer than the file system allows is refused here with ``what`` and ``flag`` (``exists()`` raised it raw)."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InputError(bad_value(what, f"{part[:40]}... ({len(os.fsencode(part))} bytes)",
                                       f"names of at most {NAME_MAX} bytes each", flag))
    try:
        return next((p for p in (path, *path.parents) if p.exists()), Path("."))
    except OSError as error:  # a path too long as a whole, a loop of links
        raise InputError(bad_value(what, str(path), f"a path the file system takes ({error.strerror})", flag)) \
            from error


def check_output_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """``folder`` can be created and written (checked before any work; nothing is left there by the check)."""
    path = Path(folder)
    existing = nearest_existing(path, "output folder", flag)
    if existing == path and not path.is_dir():
        raise InputError(bad_value("output folder", str(folder), "a folder (this is a file)", flag))
    if not existing.is_dir():
        raise InputError(bad_value("output folder", str(folder), f"a folder ({existing} is a file)", flag))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(bad_value("output folder", str(folder),
                                   f"a folder you can write ({existing} is not writable)", flag))
    probe_creatable(path, existing, flag)
    return path


def probe_creatable(path: Path, existing: Path, flag: str = "--out") -> None:
    """Create the folders from ``existing`` down to ``path`` and remove them again: ``os.access`` says yes for
    root anywhere, and some places (``/proc``, a read-only mount) refuse a new folder only when one is made."""
    created = []
    try:
        for folder in reversed([p for p in (path, *path.parents) if p not in (existing, *existing.parents)]):
            folder.mkdir()
            created.append(folder)
    except OSError as error:
        raise InputError(bad_value("output folder", str(path), f"a folder that can be created ({error.strerror} "
                                   f"at {error.filename or path})", flag)) from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass  # something else wrote there meanwhile: it is theirs
