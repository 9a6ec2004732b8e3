"""Classify streams with a model that stays loaded: video frames (file, USB webcam, Pi camera
module) and image paths (a list, a directory, or lines arriving on a pipe).

Video: `open_video(spec)` opens a frame source; `LatestFrameStream(source, classify)` reads it in
a thread that keeps only the newest frame in a one-slot holder (`LatestFrame`), while the caller's
loop classifies whatever frame is newest when the model is free. A slow model therefore skips
frames instead of building a backlog, and memory holds at most a few frames whatever the rates.
A video file is replayed at its own frame rate, so it behaves like the camera that recorded it.

Paths: `image_paths(path, recursive)` lists the images a path names (a file, or a directory's
images), each with the problem that keeps it from being read if any, without raising and without
opening a file; `read_paths(stream)` yields the paths in a byte stream (a file, stdin) line by line
as they arrive.

OpenCV (files, camera indices and device paths) and picamera2 (the Pi camera module: see
`vim_rpi.pi_camera`) are optional: each is imported only when its source is opened, and a
missing one is a ConfigError saying how to install it.
Every source yields RGB uint8 arrays (H, W, 3), the layout `Classifier.preprocess` takes, so a
frame is preprocessed exactly like the same pixels read from an image file.
"""

import dataclasses
import logging
import os
import pathlib
import stat
import sys
import threading
import time
import typing

import numpy as np

from vim_rpi import paths, pi_camera
from vim_rpi.errors import ConfigError, SourceError, VimError, option
from vim_rpi.image_preprocess import IMG_EXTENSIONS

__all__ = ["Frame", "LatestFrame", "LatestFrameStream", "OpenCVSource", "open_video", "bgr_to_rgb", "PathEntry",
           "image_paths", "read_paths", "CAMERA_TIMEOUT_S"]

_log = logging.getLogger(__name__)

CAMERA_TIMEOUT_S = 10.0  # a live camera that delivers no frame for this long is taken as gone
_FALLBACK_FPS = 30.0  # replay rate of a video file whose header gives none
_GRABS_AFTER_FAILURE = 8  # frames tried after a failed read of a file: any that comes means damage, not the end
_FRAME_COUNT_SLACK = 0.02  # of an announced frame count that may be an estimate (duration x rate)
# OpenCV cannot read frames from the V4L2 nodes of the Pi's own camera receiver (unicam on a Pi 4,
# rp1-cfe on a Pi 5), ISP and codecs, which come up first (/dev/video0-7 with a camera module).
_V4L2_SYSFS = pathlib.Path("/sys/class/video4linux")
_PI_HARDWARE_NODES = ("unicam", "rp1-cfe", "bcm2835-isp", "pispbe", "bcm2835-codec", "rpivid", "rpi-hevc")


@dataclasses.dataclass
class Frame:
    """One frame: index (0, 1, 2, ... in the order the source delivered them), t_s (seconds from
    the start of the stream to when it was read) and pixels, RGB uint8 (H, W, 3)."""

    index: int
    t_s: float
    pixels: np.ndarray


def bgr_to_rgb(bgr):
    """OpenCV's BGR uint8 (H, W, 3) -> a contiguous RGB copy."""
    return np.ascontiguousarray(bgr[..., ::-1])


class OpenCVSource:
    """A video file, or a camera through OpenCV's V4L2 backend on Linux: an index (0 = /dev/video0)
    or a device path (/dev/video2, /dev/v4l/by-id/usb-...-video-index0, which stays the same
    camera whatever order the devices came up in).

    Attributes: name (for messages), live (a camera: frames come in real time), fps (a file's
    replay rate; None for a camera, which paces itself).
    Raises (at construction): ConfigError without OpenCV; SourceError for a source it cannot open,
    or a device node of the Pi's own camera or codec hardware (not a webcam).
    """

    def __init__(self, spec):
        cv2 = _import_cv2()
        self._cv2 = cv2
        linux = sys.platform.startswith("linux")
        self.live = isinstance(spec, int) or _is_device(spec)
        if self.live:
            device = os.path.realpath(f"/dev/video{spec}" if isinstance(spec, int) else spec)
            self.name = f"camera {spec}" if device == spec or not linux else f"camera {spec} ({device})"
            _refuse_pi_hardware_node(self.name, device)
            backend = cv2.CAP_V4L2 if linux else cv2.CAP_ANY
            target = spec if isinstance(spec, int) else device
            self._capture = _quietly(cv2, lambda: cv2.VideoCapture(target, backend))
            if not self._capture.isOpened():
                self._capture.release()
                reason = ("no such device" if linux and not os.path.exists(device)
                          else "in use by another program, or not a video capture device")
                raise SourceError(f"{self.name} could not be opened: {reason}")
            self.fps = None
        else:
            self.name = str(spec)
            problem = paths.file_problem(spec)
            if problem:
                raise SourceError(problem)
            self._capture = _quietly(cv2, lambda: cv2.VideoCapture(str(spec)))
            if not self._capture.isOpened():
                self._capture.release()
                raise SourceError(f"{spec}: OpenCV cannot read this video (not a video, or a codec its "
                                  "build lacks)")
            fps = self._capture.get(cv2.CAP_PROP_FPS)
            self.fps = fps if fps and 0 < fps < 1000 else _FALLBACK_FPS

    def read(self):
        """The next frame as RGB uint8 (H, W, 3); None at the end of a file.
        Raises SourceError when a camera stops delivering frames, or when a file's frames stop
        before its end (see `_check_end`)."""
        ok, bgr = self._capture.read()
        if ok:
            return bgr_to_rgb(bgr)
        if self.live:
            raise SourceError(f"{self.name} stopped delivering frames (unplugged, or taken by another program?)")
        self._check_end()
        return None

    def _check_end(self):
        """A file's read failed: return at its end, raise SourceError when it is damaged.

        OpenCV's read() answers False alike at the end of a file and on a frame its decoder
        cannot make (FFmpeg skips to the next packet on the following call). So: a frame that
        can still be grabbed after the failure means damage at this point; none, with fewer
        frames read than the container announces (CAP_PROP_FRAME_COUNT), means a file cut
        short. Containers without a frame index announce duration x rate, an estimate: a few
        frames less than that (_FRAME_COUNT_SLACK) still count as the end.
        """
        cv2 = self._cv2
        position = int(self._capture.get(cv2.CAP_PROP_POS_FRAMES))  # frames delivered so far
        announced = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        of = f" of {announced}" if announced > 0 else ""
        if any(self._capture.grab() for _ in range(_GRABS_AFTER_FAILURE)):
            raise SourceError(f"{self.name}: frame {position}{of} could not be decoded (the file is damaged there); "
                              "repair or re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")
        if 0 < position < announced - max(1, announced * _FRAME_COUNT_SLACK):
            raise SourceError(f"{self.name}: the frames end at {position} of the {announced} the file announces "
                              "(cut short, e.g. an unfinished copy or recording); copy or record it again")

    def close(self):
        self._capture.release()


def _is_device(path):
    """Whether `path` names a device: a character device (a /dev/video* node, or a symlink to one
    such as /dev/v4l/by-id/...), or any path in /dev (a camera that is not plugged in)."""
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return os.path.abspath(path).startswith("/dev/")


def _refuse_pi_hardware_node(name, device):
    """On a Raspberry Pi the camera module's receiver, its ISP and the video codecs are V4L2 devices
    too, and they come up first (unicam or rp1-cfe take /dev/video0-7): OpenCV cannot read frames
    from them. Raise SourceError for such a node, saying how to find the webcam."""
    try:
        driver = (_V4L2_SYSFS / os.path.basename(device) / "name").read_text().strip()
    except OSError:  # not a V4L2 device, or not Linux: OpenCV says whether it can open it
        return
    if driver.startswith(_PI_HARDWARE_NODES):
        raise SourceError(f"{name} is {driver}, a node of the Pi's own camera or codec hardware, not a webcam: "
                          f"use {option('video')} picam for a camera module; `v4l2-ctl --list-devices` shows which "
                          "/dev/video* is a USB camera (or name it by its stable /dev/v4l/by-id/ path)")


def open_video(spec, *, picam_fps=None, picam_mode=None):
    """A frame source for --video SOURCE: "picam" (the Pi camera module: at most `picam_fps` frames
    a second [pi_camera.PICAM_FPS], from sensor mode `picam_mode` (w, h) [the full-field mode
    `pi_camera.choose_sensor_mode` picks]), a camera index ("0"), a camera device path (/dev/video2,
    /dev/v4l/by-id/...) or a video file (name a file called "0" as "./0")."""
    if spec == "picam":
        return pi_camera.PiCameraSource(pi_camera.PICAM_FPS if picam_fps is None else picam_fps, picam_mode)
    if spec.isascii() and spec.isdigit():
        if int(spec) >= 2**31:  # OpenCV takes a C int; no machine has that many cameras
            raise SourceError(f"camera {spec}: no such camera index; give a small number (0 = /dev/video0)")
        return OpenCVSource(int(spec))
    return OpenCVSource(spec)


def _quietly(cv2, open_capture):
    """Call open_capture() with OpenCV's own warnings off: our SourceError says it in one line."""
    cv_log = cv2.utils.logging
    level = cv_log.getLogLevel()
    cv_log.setLogLevel(cv_log.LOG_LEVEL_ERROR)
    try:
        return open_capture()
    finally:
        cv_log.setLogLevel(level)


def _import_cv2():
    try:
        import cv2
    except ImportError as error:
        raise ConfigError(f"{option('video')} with a file or camera index needs OpenCV ({error}): "
                          "pip install -r scripts/requirements-camera.txt") from None
    return cv2


class LatestFrame:
    """A one-slot holder between a reader thread and a consumer: `put` replaces the frame not yet
    taken (counted in `dropped`), `take` waits for a frame newer than the last one taken. It never
    holds more than one frame, which bounds memory whatever the source and model rates."""

    def __init__(self):
        self._changed = threading.Condition()
        self._frame = None
        self._finished = False
        self._error = None
        self.dropped = 0

    def put(self, frame):
        with self._changed:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._changed.notify()

    def finish(self, error=None):
        """No more frames will come; `error` (if any) is raised by `take` once the slot is empty."""
        with self._changed:
            self._finished, self._error = True, error
            self._changed.notify()

    def take(self, timeout=None):
        """The newest frame not yet taken; None at the end of the source.
        Raises the source's error, or TimeoutError when no frame came within `timeout` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._frame is not None or self._finished, timeout):
                raise TimeoutError
            frame, self._frame = self._frame, None
            if frame is None and self._error is not None:
                raise self._error
            return frame


class LatestFrameStream:
    """Iterate (Frame, prediction) pairs: the newest frame of `source` each time `classify` is
    free, so frames that arrive while it runs are skipped, never queued.

    Args:
        source: an object with read() -> RGB uint8 (H, W, 3) or None at the end, close(), and the
            attributes name, live and fps (see `OpenCVSource`); the reader thread owns it and
            closes it.
        classify: frame pixels -> prediction (e.g. a Classifier's classify with a top-k bound).
        max_frames: stop after classifying this many frames (None: until the source ends).
        every_s: at most one classification every `every_s` seconds (0: as fast as the model goes).
        camera_timeout_s: a live source silent this long raises SourceError (it is taken as gone).
    Attributes (updated while iterating): frames_read, classified, elapsed_s.
    Raises (while iterating, after the frames read before it): the source's SourceError, and a
    SourceError when the source ends before its first frame (a file that is not a video).
    """

    def __init__(self, source, classify, *, max_frames=None, every_s=0.0, camera_timeout_s=CAMERA_TIMEOUT_S):
        self.source, self.classify = source, classify
        self.max_frames, self.every_s, self.camera_timeout_s = max_frames, every_s, camera_timeout_s
        self.holder = LatestFrame()
        self.frames_read = self.classified = 0
        self.elapsed_s = 0.0

    def __iter__(self):
        stop = threading.Event()
        start = time.perf_counter()
        reader = threading.Thread(target=self._read, args=(stop, start), name="frame-reader", daemon=True)
        reader.start()
        timeout = self.camera_timeout_s if self.source.live else None
        try:
            while self.max_frames is None or self.classified < self.max_frames:
                try:
                    frame = self.holder.take(timeout)
                except TimeoutError:
                    raise SourceError(f"{self.source.name} delivered no frame for {timeout:g} s; "
                                      "it seems to be gone") from None
                if frame is None:
                    break
                began = time.perf_counter()
                prediction = self.classify(frame.pixels)
                self.classified += 1
                self.elapsed_s = time.perf_counter() - start
                yield frame, prediction
                pause = self.every_s - (time.perf_counter() - began)
                if pause > 0:
                    time.sleep(pause)
        finally:
            stop.set()
            # A camera read blocked on a device that went away may never return: the daemon
            # thread is then left behind rather than hanging the program.
            reader.join(timeout=2.0)
            self.elapsed_s = time.perf_counter() - start

    def _read(self, stop, start):
        """Reader thread: put every frame into the holder (a file at its own frame rate), then
        finish it, with the error that ended the source if any. Any exception ends up in the
        holder: lost in this thread, it would leave the consumer waiting forever."""
        error = None
        try:
            while not stop.is_set():
                if self.source.fps and stop.wait(max(0.0, start + self.frames_read / self.source.fps
                                                     - time.perf_counter())):
                    break
                pixels = self.source.read()
                if pixels is None:
                    if not self.frames_read:
                        raise SourceError(f"{self.source.name}: no frame could be read from it (not a video, or a "
                                          "format or codec this reader lacks)")
                    break
                self.holder.put(Frame(self.frames_read, time.perf_counter() - start, pixels))
                self.frames_read += 1
        except VimError as failure:
            error = failure
        except Exception as failure:
            error = SourceError(f"{self.source.name}: {failure}")
        finally:
            try:
                self.source.close()
            finally:
                self.holder.finish(error)


class PathEntry(typing.NamedTuple):
    """One item a path names: `path` (str) to classify, or `problem`, a one-line message naming
    the path and why it cannot be read as an image file."""

    path: str
    problem: typing.Optional[str] = None


def image_paths(path, recursive=False):
    """The items a path names, as PathEntry sorted by path:

    - a regular file: itself (reading it is left to the classifier, which reports a file that is
      not an image);
    - a directory: its image files (by extension, case-insensitive), descending into
      sub-directories with `recursive` (not into symbolic links to directories: no cycles); an
      empty list when it holds none;
    - what cannot be read as a file: an entry with its problem (missing, a dangling symbolic
      link, a name too long, no permission on it or on a directory on the way, a FIFO, socket or
      device, a directory that cannot be listed). Image-named entries of a directory are
      reported the same way, so nothing is skipped without a word.

    Nothing is opened here but directories (so a FIFO never blocks) and nothing raises: every
    OSError becomes the problem of the entry it concerns.
    """
    problem, mode = paths.stat_path(path)
    if problem is None and stat.S_ISDIR(mode):
        entries = []
        _scan(path, recursive, entries)
        return sorted(entries, key=lambda entry: entry.path)
    return [PathEntry(path, problem or paths.not_regular(path, mode))]


def _scan(directory, recursive, entries):
    """Append the entries of `directory` (and of its sub-directories, with `recursive`) to
    `entries`; a loop, not recursion, however deep the tree."""
    pending = [directory]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                children = list(listing)
        except OSError as error:
            entries.append(PathEntry(directory, f"{directory}: cannot list this directory: "
                                                f"{paths.cause(directory, error)}"))
            continue
        for child in children:
            try:
                is_directory = child.is_dir(follow_symlinks=False)
            except OSError:  # unknown type and no lstat allowed: treat it like a file, its stat says why
                is_directory = False
            if is_directory:
                if recursive:
                    pending.append(child.path)
                continue
            if os.path.splitext(child.name)[1].lower() not in IMG_EXTENSIONS:
                continue
            problem, mode = paths.stat_path(child.path)
            if problem is None and stat.S_ISDIR(mode):  # a symbolic link to a directory: not descended
                continue
            entries.append(PathEntry(child.path, problem or paths.not_regular(child.path, mode)))


def read_paths(stream):
    """Yield the paths of a binary stream, one per line, as each line arrives (blank lines skipped).
    Bytes become str as file names do (os.fsdecode), so any name the file system holds round-trips."""
    for line in iter(stream.readline, b""):
        path = os.fsdecode(line.rstrip(b"\r\n"))
        if path:
            yield path
