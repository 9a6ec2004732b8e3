"""What keeps a path someone gave from being read as a file, said in one line: the check every
reader of such a path shares (image files and directories, checkpoints).

Nothing here opens a file (opening a FIFO waits for a writer) and nothing raises: each OSError of
a stat (and the ValueError of a path holding a NUL byte) becomes its cause in words (missing, a dangling symbolic link, a name too long, no
permission on the file or on a directory on the way, ...). Python 3.11's Path.exists(),
is_file() and is_dir() raise on ENAMETOOLONG and EACCES, so they are not used for this.
"""

import errno
import os
import stat

__all__ = ["stat_path", "not_regular", "file_problem", "named_file_problem", "cause"]

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def stat_path(path):
    """(None, st_mode) of `path` (symbolic links followed), or (problem, None): the problem is
    one line, "PATH: cause"."""
    try:
        return None, os.stat(path).st_mode
    except OSError as error:
        return f"{os.fspath(path)}: {cause(path, error)}", None
    except ValueError:  # the only one os.stat raises: a NUL byte, which no file name can hold
        return f"{os.fspath(path)!r}: the path holds a NUL byte, which no file name can; give one path per line", None


def not_regular(path, mode):
    """None when `mode` is a regular file's, else the problem ("PATH: a FIFO (named pipe), not a
    regular file; ...")."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return f"{os.fspath(path)}: {kind}, not a regular file; give the path of a file"


def file_problem(path):
    """None when `path` is a regular file (whether it is readable shows when it is opened), else
    the one-line problem."""
    problem, mode = stat_path(path)
    return problem or not_regular(path, mode)


def named_file_problem(path, what):
    """`file_problem` for a file the user knows as `what` (e.g. "checkpoint"): None for a regular
    file, "WHAT not found: PATH" when nothing is there, else "WHAT PATH: cause"."""
    problem = file_problem(path)
    if problem is None:
        return None
    return f"{what} not found: {os.fspath(path)}" if _is_missing(path) else f"{what} {problem}"


def _is_missing(path):
    """Whether nothing at all, not even a dangling symbolic link, is at `path` (False when that
    cannot be told: a name too long, no permission)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return False
    return False


def cause(path, error):
    """Why the OSError `error` about `path` happened, and what to do, in a few words."""
    if error.errno == errno.ENOENT and os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "a missing file"
        return f"a symbolic link to {target}, which does not exist"
    if error.errno == errno.ENOENT:
        return "no such file"
    if error.errno == errno.ENAMETOOLONG:
        return ("name too long for the file system (usually at most 255 bytes per file name, 4096 per path); "
                "check the path")
    if error.errno == errno.EACCES:
        return "permission denied (on it, or on a directory on its path); check the permissions"
    if error.errno == errno.ELOOP:
        return "too many levels of symbolic links (a link that points back to itself?)"
    if error.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    return (error.strerror or str(error)).lower()
