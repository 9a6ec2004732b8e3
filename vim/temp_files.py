"""Temporary files that become published files: `make_temp_file` is tempfile.mkstemp, except that
the file gets the permissions any new file gets (0666 less the process umask, which the kernel
applies as it creates the file) instead of 0600. Written, then renamed into place with
os.replace, such a file reads like any other, and the umask is never read or changed (changing
it, even for a moment, would race with every other thread creating files)."""

import errno
import os
import secrets

__all__ = ["make_temp_file"]

_ATTEMPTS = 100  # names tried before giving up, as tempfile does
_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
          | getattr(os, "O_BINARY", 0))


def make_temp_file(directory, prefix="", suffix=""):
    """Create a new empty file `directory`/`prefix`RANDOM`suffix` and return (fd, path): fd open
    for writing, path a str. Raises OSError as os.open does (FileExistsError when every name
    tried was taken)."""
    for _ in range(_ATTEMPTS):
        path = os.path.join(os.fspath(directory), f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, _FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary file name in {directory}")
