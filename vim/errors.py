"""The errors this package raises for things a user can get wrong: each message says what was
wrong and what to do, so front ends print it as one line (see `cli.exit_status`)."""

__all__ = ["VimError", "ConfigError", "CheckpointError", "DamagedCheckpointError", "DownloadError", "ImageError", "ImageTooLargeError",
           "DatasetError", "SampleError", "SourceError", "TrainingError"]


class VimError(Exception):
    """Base class: a problem the user can fix; the message is meant for them."""


class ConfigError(VimError, ValueError):
    """An option that cannot work: an unknown model, a top-k beyond the class count, a backend
    or device that is not available here."""


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
