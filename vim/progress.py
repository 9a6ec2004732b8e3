"""The one progress bar of the package (downloads, evaluation, fine-tuning): tqdm on stderr.

On a terminal it redraws one line in place. When stderr is a file or a pipe (logs, CI,
`2> log`), redrawing would fill it with carriage returns, so the bar writes a plain line at most
every LOG_INTERVAL_S seconds instead, plus the final one.
"""

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]

LOG_INTERVAL_S = 10.0


class _Lines:
    """A file-like target for tqdm that turns its in-place redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(total=None, desc=None, *, enabled=True, unit="it", unit_scale=False, initial=0, stream=None):
    """A tqdm bar on `stream` (stderr); a disabled bar when not `enabled` (e.g. -q); `initial`
    counts work done before (a resumed download)."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, disable=not enabled,
                leave=True, file=stream if tty else _Lines(stream), mininterval=0.2 if tty else LOG_INTERVAL_S,
                dynamic_ncols=tty)
