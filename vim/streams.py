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

OpenCV (files, camera indices and device paths) and picamera2 (the Pi camera module, read in a
full-field sensor mode at a capped frame rate: `PiCameraSource`) are optional: each is imported
only when its source is opened, and a missing one is a ConfigError saying how to install it.
Every source yields RGB uint8 arrays (H, W, 3), the layout `Classifier.preprocess` takes, so a
frame is preprocessed exactly like the same pixels read from an image file.
"""

import contextlib
import dataclasses
import errno
import glob
import io
import logging
import os
import pathlib
import stat
import sys
import threading
import time
import typing

import numpy as np

from vim_rpi import paths
from vim_rpi.errors import ConfigError, SourceError, VimError
from vim_rpi.folder_dataset import IMG_EXTENSIONS

__all__ = ["Frame", "LatestFrame", "LatestFrameStream", "OpenCVSource", "PiCameraSource", "open_video",
           "bgr_to_rgb", "PathEntry", "image_paths", "read_paths", "picamera2_help", "choose_sensor_mode",
           "CAMERA_TIMEOUT_S", "FRAME_HEIGHT", "PICAM_FPS", "PICAM_FORMAT"]

_log = logging.getLogger(__name__)

CAMERA_TIMEOUT_S = 10.0  # a live camera that delivers no frame for this long is taken as gone
_FALLBACK_FPS = 30.0  # replay rate of a video file whose header gives none
_GRABS_AFTER_FAILURE = 8  # frames tried after a failed read of a file: any that comes means damage, not the end
_FRAME_COUNT_SLACK = 0.02  # of an announced frame count that may be an estimate (duration x rate)
# Pi camera. Frames: FRAME_HEIGHT rows (above the 256-pixel short side preprocessing takes), as
# wide as the sensor mode's aspect ratio makes them, in a multiple of _WIDTH_ALIGN pixels (the
# row alignment picamera2's align_configuration uses on a Pi 4's ISP).
FRAME_HEIGHT = 480
_WIDTH_ALIGN = 32
PICAM_FPS = 15.0  # default frame-rate cap (--picam-fps): above what the model classifies per second on a Pi
PICAM_FORMAT = "BGR888"  # libcamera's name for [R, G, B] bytes per pixel
_DARK_FRAME_US = 83_333  # longest frame in the dark (12 fps), so auto-exposure can still expose longer
_FULL_FIELD = 0.95  # a sensor mode whose crop spans this share of the largest crop, both ways, sees the full field
_LIBCAMERA_LOG_LEVELS = "*:FATAL"  # libcamera's log: our one-line errors say what went wrong
_MEDIA_DEVICES = "/dev/media*"  # the camera pipelines' media devices, which libcamera locks while it holds a camera
_PROC = pathlib.Path("/proc")
_SYSTEM_DIST_PACKAGES = pathlib.Path("/usr/lib/python3/dist-packages")  # where apt installs python3-picamera2
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
                reason = ("no such device" if linux and not os.path.exists(device)
                          else "in use by another program, or not a video capture device")
                raise SourceError(f"{self.name} could not be opened: {reason}")
            self.fps = None
        else:
            self.name = str(spec)
            if not os.path.isfile(spec):
                raise SourceError(f"{spec}: no such file")
            self._capture = _quietly(cv2, lambda: cv2.VideoCapture(str(spec)))
            if not self._capture.isOpened():
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
                          "use --video picam for a camera module; `v4l2-ctl --list-devices` shows which "
                          "/dev/video* is a USB camera (or name it by its stable /dev/v4l/by-id/ path)")


class PiCameraSource:
    """The Raspberry Pi camera module through picamera2 (libcamera): the sensor's full field of view,
    at most `max_fps` frames a second.

    Sensor mode. A sensor reads out in a few modes: some cover the whole pixel array (binned 2x2, or
    at full resolution), others a centre crop at a higher frame rate. Asked for 640x480 frames,
    picamera2 takes the mode nearest that size, a crop on the common cameras (Camera Module 2,
    IMX219: 1280x960 of the 3280x2464 array, 39 % of the width, up to 206 fps; Module 3, IMX708:
    3072x1728 of 4608x2592 at up to 120 fps). This source reads sensor mode `mode` (w, h) when
    given, else the one `choose_sensor_mode` picks (full field, binned), and its frames keep that
    mode's aspect ratio, FRAME_HEIGHT rows tall: the whole picture `rpicam-hello` shows.

    Frame rate. The FrameDurationLimits control lets a frame take between 1/max_fps s and, for a
    longer exposure in the dark, 1/12 s (picamera2's preview default), so the reader thread does
    not copy frames (1 MB each) much faster than the model takes them.

    Colour. Frames are requested as "BGR888", which libcamera (naming formats the DRM way, by the
    bits of a little-endian word) lays out as [R, G, B] bytes per pixel, so they need no channel
    swap; picamera2 trims each row's padding. The configured format and every frame's shape are
    checked against this.

    Attributes: name ("Pi camera (imx708)"), live, fps (None: the camera paces itself), mode (the
    sensor mode's (w, h); None for a camera without raw modes), shape ((H, W, 3) of every frame).
    Raises (at construction): ConfigError without a working picamera2; SourceError for no camera
    module, a busy camera (naming the process that holds it), a `mode` the sensor lacks, or a
    configuration other than the one asked for. The camera is closed on every failure after it
    was opened.
    """

    live, fps = True, None

    def __init__(self, max_fps=PICAM_FPS, mode=None):
        if not max_fps > 0:
            raise ValueError(f"max_fps must be > 0, got {max_fps}")
        picamera2 = _import_picamera2()
        self.name, self.mode, self.shape = "Pi camera", None, None
        try:
            cameras = picamera2.Picamera2.global_camera_info()  # starts libcamera's camera manager
        except Exception as error:
            raise SourceError(_open_failure(error)) from None
        if not cameras or "/usb" in cameras[0].get("Id", ""):  # picamera2 sorts USB cameras last
            raise SourceError(_no_camera_module(cameras))
        try:
            self._camera = picamera2.Picamera2()
        except Exception as error:  # picamera2 wraps what libcamera raised in a RuntimeError
            raise SourceError(_open_failure(error)) from None
        try:
            self._start(max_fps, mode)
        except BaseException as error:
            with contextlib.suppress(Exception):  # the failure that got us here is the one to report
                self._camera.close()
            if isinstance(error, VimError) or not isinstance(error, Exception):
                raise
            raise SourceError(f"{self.name} could not be started: {_reason(error)}") from None

    def _start(self, max_fps, mode):
        camera = self._camera
        model = camera.camera_properties.get("Model")
        if model:
            self.name = f"Pi camera ({model})"
        chosen = choose_sensor_mode(camera.sensor_modes, mode, self.name)
        sensor, size = {}, (640, FRAME_HEIGHT)
        if chosen is not None:
            self.mode = tuple(chosen["size"])
            sensor = {"output_size": self.mode, "bit_depth": chosen["bit_depth"]}
            size = _frame_size(self.mode)
        controls = {}
        if "FrameDurationLimits" in camera.camera_controls:
            shortest = round(1e6 / max_fps)
            controls["FrameDurationLimits"] = (shortest, max(shortest, _DARK_FRAME_US))
        camera.configure(camera.create_preview_configuration(main={"size": size, "format": PICAM_FORMAT},
                                                             sensor=sensor, controls=controls))
        self._check(camera.camera_config)
        camera.start()
        mode_text = f"sensor mode {self.mode[0]}x{self.mode[1]}, " if self.mode else ""
        _log.info(f"{self.name}: {mode_text}{self.shape[1]}x{self.shape[0]} frames, at most {max_fps:g} per second")

    def _check(self, config):
        """Fail unless the camera was configured as the code reads it: PICAM_FORMAT frames (RGB) from
        the chosen sensor mode. Sets `shape` from the configured size (libcamera may adjust it)."""
        main = config["main"]
        if main["format"] != PICAM_FORMAT:
            raise SourceError(f"{self.name} was configured for {main['format']} frames, not {PICAM_FORMAT} (RGB): "
                              "this picamera2 or libcamera does not deliver what vim_rpi reads")
        width, height = main["size"]
        self.shape = (height, width, 3)
        running = (config.get("sensor") or {}).get("output_size")
        if self.mode is not None and running is not None and tuple(running) != self.mode:
            raise SourceError(f"{self.name} runs sensor mode {running[0]}x{running[1]}, not the "
                              f"{self.mode[0]}x{self.mode[1]} asked for")

    def read(self):
        """The next frame, RGB uint8 (H, W, 3) of `shape`. Blocks while the camera delivers none (a
        stalled camera: the stream's watchdog gives up on it). Raises SourceError when picamera2
        fails or delivers a frame of another shape or type."""
        try:
            pixels = self._camera.capture_array("main")
        except Exception as error:  # picamera2 raises several kinds when the camera goes away
            raise SourceError(f"{self.name} stopped delivering frames: {error}") from None
        if pixels.shape != self.shape or pixels.dtype != np.uint8:
            raise SourceError(f"{self.name} delivered a {pixels.dtype} frame of shape {pixels.shape}, not the "
                              f"configured uint8 {self.shape}")
        return pixels

    def close(self):
        try:
            self._camera.stop()
        finally:
            self._camera.close()


def choose_sensor_mode(modes, size=None, name="the Pi camera"):
    """The sensor mode to read: the one of `size` (w, h) when given (of the highest bit depth), else
    the smallest mode that covers the full field of view and is at least FRAME_HEIGHT rows tall,
    or the largest full-field mode when none is that tall. A mode covers the full field when its
    crop spans at least _FULL_FIELD of the largest crop's width and height. On the Raspberry Pi
    cameras that is a binned mode (Camera Module 1, OV5647: 640x480; Module 2, IMX219: 1640x1232;
    Module 3, IMX708: 2304x1296; HQ, IMX477: 2028x1520), where the mode nearest 640x480 is a
    centre crop on all but Module 1.

    Args:
        modes: picamera2's `sensor_modes`: dicts with "size" (w, h), "bit_depth", "fps" and
            "crop_limits" (x, y, w, h) in pixel-array coordinates; entries without "size" (not a
            raw sensor) are ignored.
        size: the (w, h) of the mode wanted (--picam-mode), or None.
        name: the camera, for messages.
    Returns: the chosen mode dict, or None when no mode has a size (nothing to choose).
    Raises: SourceError when `size` is not one of the modes' sizes.
    """
    sized = [mode for mode in modes if "size" in mode and "crop_limits" in mode]
    if size is not None:
        matching = [mode for mode in sized if tuple(mode["size"]) == tuple(size)]
        if not matching:
            listed = ", ".join(f"{w}x{h}" for w, h in sorted({tuple(mode["size"]) for mode in sized})) or "none"
            raise SourceError(f"{name} has no sensor mode {size[0]}x{size[1]} (--picam-mode); its modes: {listed}")
        return max(matching, key=lambda mode: mode["bit_depth"])
    if not sized:
        return None
    largest = max(sized, key=lambda mode: mode["crop_limits"][2] * mode["crop_limits"][3])["crop_limits"]
    full = [mode for mode in sized if mode["crop_limits"][2] >= _FULL_FIELD * largest[2]
            and mode["crop_limits"][3] >= _FULL_FIELD * largest[3]]
    tall = [mode for mode in full if mode["size"][1] >= FRAME_HEIGHT]
    if tall:
        return min(tall, key=lambda mode: (mode["size"][0] * mode["size"][1], -mode["bit_depth"]))
    return max(full, key=lambda mode: (mode["size"][0] * mode["size"][1], mode["bit_depth"]))


def _frame_size(mode_size):
    """(w, h) of the frames read from a sensor mode of `mode_size` (w, h): FRAME_HEIGHT rows (a
    shorter mode's own height) and the mode's aspect ratio, the width a multiple of _WIDTH_ALIGN."""
    width, height = mode_size
    rows = min(FRAME_HEIGHT, height) // 2 * 2
    return max(_WIDTH_ALIGN, round(rows * width / height / _WIDTH_ALIGN) * _WIDTH_ALIGN), rows


def _chain(error):
    """`error` and the exceptions it was raised from (__cause__, else __context__), outermost first."""
    chain = [error]
    while (error := error.__cause__ or error.__context__) is not None and error not in chain:
        chain.append(error)
    return chain


def _reason(error):
    """The innermost cause of `error` in one short line (picamera2's messages can hold a whole
    configuration dict, which is cut off)."""
    root = _chain(error)[-1]
    lines = str(root).strip().splitlines()
    text = lines[0].split(": {", 1)[0] if lines else type(root).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _open_failure(error):
    """The message for Picamera2() failing: the camera busy (who holds it, how to free it), gone,
    or libcamera's own reason."""
    chain = _chain(error)
    if any(isinstance(e, IndexError) for e in chain):  # picamera2 indexes its list of cameras
        return _no_camera_module([])
    if any(getattr(e, "errno", None) == errno.EBUSY or os.strerror(errno.EBUSY) in str(e) for e in chain):
        return _camera_busy(_camera_lock_holders())
    return (f"the Pi camera could not be opened: {_reason(error)} (`rpicam-hello --list-cameras` lists the "
            "cameras libcamera sees)")


def _no_camera_module(cameras):
    """What to check when libcamera lists no camera module (`cameras`: the USB cameras it lists)."""
    denied = [path for path in sorted(glob.glob(_MEDIA_DEVICES)) if not os.access(path, os.R_OK | os.W_OK)]
    if denied:
        return (f"no camera found: this user may not open {denied[0]} (libcamera needs the video group): "
                "sudo usermod -aG video $USER, then log in again")
    if cameras:
        return ("libcamera finds no camera module, only a USB camera: read that with --video N or its "
                "/dev/v4l/by-id/ path (`v4l2-ctl --list-devices` lists them)")
    return ("no camera module found: `rpicam-hello --list-cameras` should list it; if it does not, power off and "
            "reseat the ribbon cable at both ends (contacts the right way round), and check that "
            "/boot/firmware/config.txt has camera_auto_detect=1 or the dtoverlay line for your sensor")


def _camera_busy(holders):
    """The message for a camera another process holds (`holders`: their pids, maybe none known)."""
    if not holders:
        return ("the Pi camera is in use by another program (an rpicam or libcamera app, a picamera2 script, "
                "another infer_rpi.py, or a service such as motion); `sudo fuser -v /dev/media*` names it")
    return "the Pi camera is in use by " + "; and by ".join(
        f"{who}: {how}" for who, how in (_describe_process(pid) for pid in holders))


def _camera_lock_holders(devices=None, locks=None):
    """Pids of the other processes that hold a camera: libcamera takes a POSIX lock (lockf) on each
    media device (/dev/media*) of a camera it acquires, and /proc/locks lists each lock's pid and
    file (major:minor of its file system in hex, then the inode). Empty when none can be found."""
    files = {}
    for path in glob.glob(_MEDIA_DEVICES if devices is None else devices):
        with contextlib.suppress(OSError):
            status = os.stat(path)
            files[(os.major(status.st_dev), os.minor(status.st_dev), status.st_ino)] = path
    try:
        lines = (_PROC / "locks" if locks is None else locks).read_text().splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:  # "1: POSIX  ADVISORY  WRITE 1234 00:05:301 0 EOF"; a waiter has "->" after the number
        fields = line.split()[1:]
        if len(fields) < 5 or fields[0] == "->":
            continue
        try:
            pid = int(fields[3])
            major, minor, inode = fields[4].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
        except ValueError:
            continue
        if key in files and pid > 0 and pid != os.getpid() and pid not in holders:
            holders.append(pid)
    return holders


def _describe_process(pid, proc=None):
    """(who, how to free the camera) for process `pid`: a system service, a user's service (e.g.
    PipeWire's wireplumber), or a program, told apart by the systemd unit its cgroup names."""
    base = (_PROC if proc is None else proc) / str(pid)
    try:
        program = " ".join(os.fsdecode(arg) for arg in (base / "cmdline").read_bytes().split(b"\0")[:2] if arg)
    except OSError:
        program = ""
    try:
        cgroups = (base / "cgroup").read_text().splitlines()
    except OSError:
        cgroups = []
    for line in cgroups:  # "0::/system.slice/motion.service"; v1 systems also have "1:name=systemd:/..."
        path = line.split(":", 2)[-1]
        unit = path.rsplit("/", 1)[-1]
        if unit.endswith(".service"):
            if "/user@" in path:
                return (f"the user service {unit} (pid {pid}: {program})", f"stop it: systemctl --user stop {unit}")
            return f"the service {unit} (pid {pid}: {program})", f"stop it: sudo systemctl stop {unit}"
    return f"pid {pid} ({program or 'a process that has ended'})", f"close it, or end it: kill {pid}"


def open_video(spec, *, picam_fps=None, picam_mode=None):
    """A frame source for --video SOURCE: "picam" (the Pi camera module: at most `picam_fps` frames
    a second [PICAM_FPS], from sensor mode `picam_mode` (w, h) [the full-field mode
    `choose_sensor_mode` picks]), a camera index ("0"), a camera device path (/dev/video2,
    /dev/v4l/by-id/...) or a video file (name a file called "0" as "./0")."""
    if spec == "picam":
        return PiCameraSource(PICAM_FPS if picam_fps is None else picam_fps, picam_mode)
    if spec.isdigit():
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
        raise ConfigError(f"--video with a file or camera index needs OpenCV ({error}): "
                          "pip install -r scripts/requirements-camera.txt") from None
    return cv2


def _import_picamera2():
    """Import picamera2 (apt's python3-picamera2) so that a failure is one line: libcamera logs
    only fatal errors unless LIBCAMERA_LOG_LEVELS says otherwise (it reads the variable once, when
    first loaded), picamera2's Python loggers only critical ones, and what the import prints (numpy
    warns about modules built for another numpy) is shown only when it succeeds.
    Raises ConfigError when picamera2 is missing, or found but fails to import."""
    os.environ.setdefault("LIBCAMERA_LOG_LEVELS", _LIBCAMERA_LOG_LEVELS)
    logging.getLogger("picamera2").setLevel(logging.CRITICAL)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            import picamera2
    except ModuleNotFoundError as error:
        if error.name != "picamera2":
            raise ConfigError(_broken_picamera2(error)) from None
        raise ConfigError(f"--video picam needs picamera2 ({error}). " + picamera2_help()) from None
    except Exception as error:  # found, but broken: typically a numpy other than the one apt's build expects
        raise ConfigError(_broken_picamera2(error)) from None
    sys.stderr.write(printed.getvalue())
    return picamera2


def _broken_picamera2(error):
    """The message for a picamera2 that is installed but fails to import with `error`. apt builds
    python3-picamera2's compiled dependencies (simplejpeg) against the system's numpy; a numpy
    pip-installed into the venv hides it, and simplejpeg then fails with "numpy.dtype size
    changed" (bookworm: numpy 1.24 against the venv's numpy 2)."""
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else ""
    message = f"--video picam: picamera2 fails to import ({type(error).__name__}: {first_line})"
    numpy_dir = pathlib.Path(np.__file__).parent.parent
    if "numpy" not in text.lower() or numpy_dir == _SYSTEM_DIST_PACKAGES:
        return message + "; run `python3 -c 'import picamera2'` to see why"
    return (f"{message}: apt's picamera2 is built against the system's numpy, which numpy {np.__version__} in "
            f"{numpy_dir} hides; run: bash scripts/setup_rpi.sh --system-site-packages (it removes that numpy "
            "from the venv)")


def picamera2_help(prefix=None, base_prefix=None, system_packages=_SYSTEM_DIST_PACKAGES):
    """What to do when picamera2 does not import. Raspberry Pi OS ships it as the apt package
    python3-picamera2 (it must match the system's libcamera, so not from pip), which a venv sees
    only when it was made with --system-site-packages."""
    prefix = sys.prefix if prefix is None else prefix
    base_prefix = sys.base_prefix if base_prefix is None else base_prefix
    steps = []
    if not (system_packages / "picamera2").is_dir():
        steps.append("install it: sudo apt install python3-picamera2")
    if prefix != base_prefix and not _sees_system_packages(pathlib.Path(prefix)):
        steps.append(f"this venv ({prefix}) does not see system packages; let it, keeping what it holds: "
                     f"bash scripts/setup_rpi.sh --system-site-packages (or python3 -m venv --system-site-packages "
                     f"{prefix})")
    if not steps:
        steps.append("python3-picamera2 is installed but does not import with this Python: run "
                     "`python3 -c 'import picamera2'` to see why")
    return "; then ".join(steps)


def _sees_system_packages(venv):
    """Whether the venv's pyvenv.cfg says include-system-site-packages = true."""
    try:
        lines = (venv / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "include-system-site-packages":
            return value.strip().lower() == "true"
    return False


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
