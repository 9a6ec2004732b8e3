"""The errors this package raises for things a user can get wrong: each message says what was
wrong and what to do, so front ends print it as one line (see `cli.exit_status`).

A message that names an option (a `ClassifierConfig` field such as max_image_mb, or another
keyword such as trust_checkpoint) marks it with `option(name)`: `str(error)` shows the Python name,
and a front end shows its own spelling with `error.render(spell)` (the command line's
--max-image-mb, a query parameter's topk), so the library never speaks in one front end's flags.
"""

import re

__all__ = ["VimError", "ConfigError", "CheckpointError", "DamagedCheckpointError", "DownloadError", "ImageError",
           "ImageTooLargeError", "DatasetError", "SampleError", "SourceError", "TrainingError", "option", "quoted"]

_MARK = "\0"  # around an option name in a message; never part of a path or a number
_MARKED = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*){_MARK}")


def option(name):
    """`name` marked as an option in an error message (see the module docstring)."""
    return f"{_MARK}{name}{_MARK}"


def quoted(error):
    """The message of `error` as it was written, option marks kept: what another error quotes."""
    return error.args[0] if isinstance(error, VimError) and error.args else str(error)


class VimError(Exception):
    """Base class: a problem the user can fix; the message is meant for them."""

    def render(self, spell=str):
        """The message with each marked option `name` shown as `spell(name)`."""
        return _MARKED.sub(lambda found: spell(found.group(1)), str(self.args[0]) if self.args else "")

    def __str__(self):
        return self.render()


class ConfigError(VimError, ValueError):
    """An option that cannot work: an unknown model, a top-k beyond the class count, a backend
    or device that is not available here. `field`: the option it is about, when it is one."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


class CheckpointError(VimError):
    """A checkpoint that cannot be used (unreadable, unsafe, or not for this model)."""


class DamagedCheckpointError(CheckpointError):
    """The file is not a readable checkpoint at all (truncated, corrupted, another kind of file):
    a cached download in this state is fetched again."""


class DownloadError(CheckpointError):
    """A checkpoint could not be found or fetched."""


class ImageError(VimError):
    """An image cannot be used; the message names the image and says what is wrong."""


class ImageTooLargeError(ImageError):
    """An image whose decoded pixels would exceed the memory budget for one image (found from its
    header, before decoding); the message names the budget and how to raise it. A server answers 413."""


class DatasetError(VimError):
    """A dataset directory is unusable."""


class SampleError(VimError):
    """One image of a dataset could not be read; the message names the file."""


class SourceError(VimError):
    """A video source (file, camera) cannot be opened, or stopped delivering frames."""


class TrainingError(VimError):
    """Training cannot go on (e.g. the loss became NaN, or a checkpoint could not be written)."""
