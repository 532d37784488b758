"""Atomic writes that never lose what medldm did not write.

:func:`atomic_file` and :func:`atomic_dir` yield a temporary sibling of the destination; on success it is
renamed onto the destination, so readers see the old result or the new one, never half of one. Rules:

* **Nothing foreign is replaced.** ``replace=False`` never replaces an existing destination (a race with
  another writer included: the file is linked into place, which fails when the name exists). A folder is
  replaced only when ``replace`` is true *and* the existing folder is medldm's (``owned(dest)``; default
  :func:`medldm_written`: only files medldm writes, e.g. ``IM00001.dcm`` written by medldm,
  ``config.yaml``, ``*.safetensors``). An empty folder is filled; a regular file where a folder should go,
  or a folder where a file should go, is an error (:class:`FileExistsError`), never converted.
* **Recognisable temporary names.** Temporaries are ``.medldm-tmp.<pid>.<host>.<name>.<random>`` (and
  ``.medldm-old.…`` for a folder being replaced). The first atomic write into a folder (per process)
  removes such leftovers of *dead* processes of this host there (a ``kill -9`` mid-write);
  :func:`clean_stale` does it on request. Nothing else is ever removed.
* **The umask is respected.** ``mkstemp``/``mkdtemp`` create 0600/0700; before the rename the file gets
  ``0o666 & ~umask`` and the folder ``0o777 & ~umask``, like any file a program creates.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_TAG = ".medldm-tmp"
OLD_TAG = ".medldm-old"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_OURS = re.compile(r"^\.medldm-(?:tmp|old)\.(\d+)\.([0-9a-f]{8})\.")
_MEDLDM_NAMES = {"config.yaml", "extra.json", "trainer_state.pt", "card.json"}
_DICOM_NAME = re.compile(r"^IM\d{5}\.dcm$")


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _tmp_prefix(tag: str, dest: Path) -> str:
    return f"{tag}.{os.getpid()}.{_HOST}.{dest.name[:80]}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's process)
        return True
    return True


_cleaned: set[str] = set()


def _clean_once(folder: Path) -> None:
    """:func:`clean_stale` of ``folder`` once per process (a folder of many outputs is listed once)."""
    key = str(folder)
    if key not in _cleaned:
        _cleaned.add(key)
        clean_stale(folder)


def clean_stale(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Remove medldm temporaries (``.medldm-tmp.*``, ``.medldm-old.*``) left in ``folder`` by processes of
    this host that no longer run (killed mid-write). Anything else, and temporaries of live processes or
    other hosts, are left alone. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _OURS.match(e.name)
        if m:
            if m.group(2) != _HOST or _alive(int(m.group(1))):
                continue
            p = Path(e.path)
            try:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
            except OSError:
                pass
        elif recursive and not e.name.startswith(".") and e.is_dir(follow_symlinks=False):
            removed += clean_stale(e.path, recursive=True)
    return removed


def _chmod_new(path: Path, folder: bool) -> None:
    mode = (0o777 if folder else 0o666) & ~umask()
    os.chmod(path, mode)


def _no_replace(tmp: Path, dest: Path) -> None:
    """Move file ``tmp`` to ``dest`` unless ``dest`` exists (atomic: a hard link fails on an existing name)."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists already (not replaced)", str(dest)) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dest):  # a file system without hard links: check, then rename
            raise FileExistsError(errno.EEXIST, "exists already (not replaced)", str(dest)) from None
        os.rename(tmp, dest)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, suffix: str = "", *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed to ``dest``.

    ``suffix`` is appended to the temporary name so writers that dispatch on the extension
    (e.g. nibabel's ``.nii.gz``) still see it. ``replace=False``: an existing ``dest`` is kept and
    :class:`FileExistsError` raised. A folder at ``dest`` is never replaced.
    """
    dest = Path(os.path.abspath(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir() and not dest.is_symlink():
        raise FileExistsError(errno.EISDIR, "is a folder, not a file: not replaced", str(dest))
    if not replace and os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "exists already (not replaced)", str(dest))
    _clean_once(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(TMP_TAG, dest), suffix=suffix or "".join(dest.suffixes),
                               dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _chmod_new(tmp, folder=False)
        if replace:
            if dest.is_dir() and not dest.is_symlink():
                raise FileExistsError(errno.EISDIR, "is a folder, not a file: not replaced", str(dest))
            os.replace(tmp, dest)
        else:
            _no_replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def medldm_written(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds only regular files that medldm writes: DICOM slices ``IM#####.dcm`` whose
    file meta names medldm's implementation, model/checkpoint files (``config.yaml``, ``extra.json``,
    ``*.safetensors``, ``trainer_state.pt``, ``card.json``). Anything else (a user's file, a sub-folder, a
    link) makes it False."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    for e in entries:
        if not e.is_file(follow_symlinks=False):
            return False
        if e.name in _MEDLDM_NAMES or e.name.endswith(".safetensors"):
            continue
        if _DICOM_NAME.match(e.name) and _medldm_dicom(Path(e.path)):
            continue
        return False
    return True


def _medldm_dicom(path: Path) -> bool:
    try:
        import pydicom  # lazy: io.atomic (imported by medldm.config) stays free of pydicom

        from medldm.io.dicom_uids import IMPLEMENTATION_CLASS_UID  # lazy: as pydicom above

        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return False
    return str(meta.get("ImplementationClassUID", "")) == str(IMPLEMENTATION_CLASS_UID)


def _nonempty_dir(p: Path) -> bool:
    try:
        with os.scandir(p) as it:
            return any(True for _ in it)
    except OSError:
        return True


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, replace: bool = True,
               owned: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it becomes ``dest``.

    A missing or empty ``dest`` is simply created. A non-empty ``dest`` is replaced whole only when
    ``replace`` is true and ``owned(dest)`` (default :func:`medldm_written`) says medldm wrote it; otherwise
    :class:`FileExistsError` is raised (when the new folder is complete, just before the rename) and ``dest``
    is left as it was. A regular file or link at ``dest`` is never replaced. Two writers racing for the same ``dest``: the last one wins when replacing is allowed,
    else the second gets :class:`FileExistsError`.
    """
    dest = Path(os.path.abspath(dest))
    owned = owned or medldm_written

    def check() -> None:
        if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir()):
            raise FileExistsError(errno.ENOTDIR, "exists and is not a folder: not replaced", str(dest))
        if dest.is_dir() and _nonempty_dir(dest):
            if not replace:
                raise FileExistsError(errno.EEXIST, "exists already (not replaced)", str(dest))
            if not owned(dest):
                raise FileExistsError(errno.EEXIST, "is a non-empty folder that medldm did not write: "
                                      "not replaced", str(dest))

    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(TMP_TAG, dest), dir=dest.parent))
    try:
        yield tmp
        _chmod_new(tmp, folder=True)
        for _ in range(5):
            check()
            try:
                os.rename(tmp, dest)  # succeeds onto a missing or empty folder
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(OLD_TAG, dest), dir=dest.parent))
            try:
                os.rename(dest, old / "x")
            except FileNotFoundError:  # another writer moved it meanwhile: try again
                old.rmdir()
                continue
            try:
                os.rename(tmp, dest)
            except OSError:
                with contextlib.suppress(OSError):
                    os.rename(old / "x", dest)  # put the previous result back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
            break
        else:
            raise FileExistsError(errno.EEXIST, "another process keeps writing it: not replaced", str(dest))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
