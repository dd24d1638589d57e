"""Writing a file so that a stop never leaves half of it and a planted path is never followed."""

from __future__ import annotations

import os
import stat
import tempfile
from typing import BinaryIO, Callable

from .errors import InvalidArgumentError


def replace_file(path, write: Callable[[BinaryIO], None], what: str) -> None:
    """Write a new file at ``path`` through ``write(f)`` (f opened for binary writing).

    The data goes to a new file of our own next to ``path`` (O_EXCL, random name: a planted file
    or symlink cannot redirect it), which is renamed over ``path`` once complete; any exception,
    Ctrl-C included, removes it. ``path`` may be absent or a regular file; anything else there (a
    symlink, a device, a directory, a pipe) is refused with InvalidArgumentError naming ``what``,
    before anything is written, and again just before the rename."""
    path = os.fspath(path)
    _check_target(path, what)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the mode open() would have given
        with os.fdopen(fd, "wb") as f:
            write(f)
        _check_target(path, what)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_target(path: str, what: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise InvalidArgumentError(f"{what}: {path!r} exists and is {kind}; refusing to replace it "
                                   "(name a new path or a regular file)")


def _umask() -> int:
    """The process's umask, without changing it (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
