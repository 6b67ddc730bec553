"""Key files on disk: read with limits, written atomically, replaced in a rollover.

A private key is created 0600 from its first byte (``O_CREAT|O_EXCL`` with mode 0600 in the
target directory, then renamed or linked into place), so it is never readable by others, not
even briefly; every file is replaced by a rename, so a reader sees the old or the new file,
never a partial one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

KEY_MODE = 0o600
CERT_MODE = 0o644
MAX_FILE = 1 << 20  # a key or certificate file is a few KiB; more is not one


class KeyFileError(Exception):
    """A key or certificate file that cannot be used; ``str()`` is the operator's line."""


def read_file(path: str, what: str) -> tuple[bytes, os.stat_result]:
    """Bytes and fstat of a regular file (O_NONBLOCK: a FIFO must not hang a reload)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} {path}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE:
            chunk = os.read(fd, MAX_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE:
        raise KeyFileError(f"{what} {path}: larger than {MAX_FILE} bytes")
    return data, st



def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}.{secrets.token_hex(6)}")


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int,
                 overwrite: bool = False) -> None:
    """Write a file that appears complete or not at all, with ``mode`` from its first
    byte (created 0600-or-narrower by O_EXCL in the same directory, then fchmod).
    Without ``overwrite``, an existing file is left alone: FileExistsError."""
    target = Path(path)
    tmp = _temp_name(target, "new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode & 0o600)  # never more than the owner can read while being written
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, target)
        else:
            _link_no_clobber(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(target.parent)


def _link_no_clobber(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # atomic, and fails if dst exists
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if dst.exists() or dst.is_symlink():  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)


def _keep_old(path: Path, mode: int | None) -> Path:
    """``path`` stays, and ``path.old`` becomes the same file (hard link, else a copy)."""
    old = path.with_name(path.name + ".old")
    tmp = _temp_name(old, "tmp")
    try:
        try:
            os.link(path, tmp)
        except OSError:
            data, st = read_file(str(path), "file")
            write_atomic(tmp, data, mode if mode is not None else stat.S_IMODE(st.st_mode))
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, old)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return old


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst``; across file systems: atomic copy, then remove src."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        data, st = read_file(str(src), "file")
        write_atomic(dst, data, stat.S_IMODE(st.st_mode), overwrite=True)
        with contextlib.suppress(OSError):
            os.chown(dst, st.st_uid, st.st_gid)
        os.unlink(src)


def promote(key: Path, cert: Path, next_key: Path, next_cert: Path) -> tuple[Path, Path]:
    """next → current: the current pair is kept as ``.old`` (links made before anything
    moves), then the next key and certificate are renamed over the current ones.  Every
    path always holds a complete file; between the two renames the key is new and the
    certificate old, which load_keypair reads twice before refusing."""
    old_key = _keep_old(key, KEY_MODE)
    old_cert = _keep_old(cert, None)
    _move(next_key, key)
    try:
        _move(next_cert, cert)
    except OSError:
        # Undo, best effort: the next key back in its place, the current key in its own.
        with contextlib.suppress(OSError):
            os.link(key, next_key)
        with contextlib.suppress(OSError):
            tmp = _temp_name(key, "undo")
            os.link(old_key, tmp)
            os.replace(tmp, key)
        raise
    for d in {key.parent, cert.parent, next_key.parent, next_cert.parent}:
        _fsync_dir(d)
    return old_key, old_cert
