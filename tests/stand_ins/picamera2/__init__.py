"""A STAND-IN for picamera2 (apt's python3-picamera2), used by tests/test_camera.py: the real module
needs a Raspberry Pi, a camera module and libcamera. It behaves like picamera2 0.3.13 and later
(Raspberry Pi OS bookworm and trixie) where vim_rpi relies on it, read from picamera2's source:

- Picamera2.global_camera_info() (static; camera modules first, USB cameras last) and
  Picamera2(camera_num=0), which indexes that list: no camera is an IndexError. A camera that
  another process holds is RuntimeError("Camera __init__ sequence did not complete."), raised
  from libcamera's RuntimeError("Failed to acquire camera: Device or resource busy") after an
  error record on the "picamera2" logger.
- sensor_modes (each with size, bit_depth, fps and crop_limits, as rpicam-hello --list-cameras
  shows them on a Pi 4), sensor_resolution, camera_properties, camera_controls.
- create_preview_configuration / create_video_configuration: our dicts merged over picamera2's
  defaults (XBGR8888 640x480 main, a raw stream, FrameDurationLimits). configure() checks the
  keys as picamera2 does, picks the sensor mode nearest sensor["output_size"] (else the raw size,
  else the main size), which for the default 640x480 is a centre crop as on the real camera, and
  fills camera_config: the main stream's format, size, stride (rows padded to 64 bytes) and the
  sensor mode.
- capture_array("main"): the newest frame not yet returned (at most one is queued), paced by the
  mode's top rate and FrameDurationLimits, laid out as libcamera lays out the format (BGR888:
  [R, G, B] bytes per pixel; RGB888: [B, G, R]) and trimmed of row padding as picamera2 trims it.
  Pixels show `scene(width, height, index)`. A stalled camera blocks in capture_array like the
  real one (its request never completes) until `release()`.
- libcamera's log lines go to file descriptor 2, as the C++ library writes them, unless
  LIBCAMERA_LOG_LEVELS (read at import) sets a higher level.

Environment variables (read when each call is made):
  STAND_IN_LOG          a file receiving one JSON line per call
  STAND_IN_SENSOR       imx219 (default), imx708, imx477, ov5647, usb (a USB webcam only) or none
  STAND_IN_BUSY         set: another process holds the camera
  STAND_IN_FAIL         configure or start: that call fails as libcamera's failures do
  STAND_IN_FORMAT       the main format configure reports (as if libcamera had adjusted it)
  STAND_IN_STALL_AFTER  capture_array blocks after this many frames
  STAND_IN_PADDED       set: capture_array returns rows with their padding (as if not trimmed)
"""

import json
import logging
import math
import os
import threading
import time

import numpy as np

_log = logging.getLogger("picamera2.picamera2")
_LEVELS = {"DEBUG": 0, "INFO": 1, "WARN": 2, "ERROR": 3, "FATAL": 4}
_shown_level = 1  # libcamera's default: INFO and above
for _entry in os.environ.get("LIBCAMERA_LOG_LEVELS", "").split(","):
    _category, _, _level = _entry.rpartition(":")
    if _category == "*":
        _shown_level = int(_level) if _level.isdigit() else _LEVELS.get(_level, _shown_level)

# (unpacked format, bit depth, (w, h), top fps, crop (x, y, w, h) in pixel-array coordinates)
_MODES = {
    "imx219": [(fmt, depth, size, fps, crop) for fmt, depth in (("SRGGB10", 10), ("SRGGB8", 8)) for size, fps, crop in (
        ((640, 480), 206.65, (1000, 752, 1280, 960)), ((1640, 1232), 41.85, (0, 0, 3280, 2464)),
        ((1920, 1080), 47.57, (680, 692, 1920, 1080)), ((3280, 2464), 21.19, (0, 0, 3280, 2464)))],
    "imx708": [("SRGGB10", 10, (1536, 864), 120.13, (768, 432, 3072, 1728)),
               ("SRGGB10", 10, (2304, 1296), 56.03, (0, 0, 4608, 2592)),
               ("SRGGB10", 10, (4608, 2592), 14.35, (0, 0, 4608, 2592))],
    "imx477": [("SRGGB10", 10, (1332, 990), 120.05, (696, 528, 2664, 1980)),
               ("SRGGB12", 12, (2028, 1080), 50.03, (0, 440, 4056, 2160)),
               ("SRGGB12", 12, (2028, 1520), 40.01, (0, 0, 4056, 3040)),
               ("SRGGB12", 12, (4056, 3040), 10.0, (0, 0, 4056, 3040))],
    "ov5647": [("SGBRG10", 10, (640, 480), 58.92, (16, 0, 2560, 1920)),
               ("SGBRG10", 10, (1296, 972), 46.34, (0, 0, 2592, 1944)),
               ("SGBRG10", 10, (1920, 1080), 32.81, (348, 434, 1928, 1080)),
               ("SGBRG10", 10, (2592, 1944), 15.63, (0, 0, 2592, 1944))],
}
_BYTES_PER_PIXEL = {"BGR888": 3, "RGB888": 3, "XBGR8888": 4, "XRGB8888": 4}
_stall_released = threading.Event()
_manager_started = False


def scene(width, height, index):
    """What the camera sees in frame `index`, RGB uint8 (height, width, 3): red rises from left to
    right, green from top to bottom, blue is flat and changes from frame to frame."""
    red = np.linspace(0, 255, width).round().astype(np.uint8)
    green = np.linspace(0, 255, height).round().astype(np.uint8)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = red[None, :]
    pixels[..., 1] = green[:, None]
    pixels[..., 2] = (60 + 25 * index) % 256
    return pixels


def release():
    """Let every stalled capture_array return (a test's teardown)."""
    _stall_released.set()


def _call(*call):
    path = os.environ.get("STAND_IN_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(call) + "\n")


def _libcamera_log(level, text):
    if _LEVELS[level] >= _shown_level:
        os.write(2, f"[0:12:34.567890123] [4242] {level:>5} {text}\n".encode())


def _sensor():
    return os.environ.get("STAND_IN_SENSOR", "imx219")


class Picamera2:
    @staticmethod
    def global_camera_info():
        global _manager_started
        if not _manager_started:
            _libcamera_log("INFO", "Camera camera_manager.cpp:327 libcamera v0.5.0+59-stand-in")
            _manager_started = True
        sensor = _sensor()
        if sensor == "none":
            return []
        if sensor == "usb":
            return [{"Model": "HD Pro Webcam C920", "Location": 2, "Rotation": 0, "Num": 0,
                     "Id": "/base/scb/pcie@7d500000/pci@0,0/usb@0,0-1.2:1.0-046d:082d"}]
        return [{"Model": sensor, "Location": 2, "Rotation": 0, "Num": 0,
                 "Id": f"/base/soc/i2c0mux/i2c@1/{sensor}@10"}]

    def __init__(self, camera_num=0, tuning=None):
        self.is_open, self.started, self.camera_config = False, False, {}
        info = self.global_camera_info()[camera_num]
        _call("Picamera2", camera_num)
        if os.environ.get("STAND_IN_BUSY"):
            _libcamera_log("INFO", "Camera camera.cpp:1008 Pipeline handler in use by another process")
            _log.error("Camera __init__ sequence did not complete.")
            raise RuntimeError("Camera __init__ sequence did not complete.") from RuntimeError(
                "Failed to acquire camera: Device or resource busy")
        self.is_open = True
        self._model = info["Model"]
        self._modes = [{"format": f"{fmt}_CSI2P", "unpacked": fmt, "bit_depth": depth, "size": size, "fps": fps,
                        "crop_limits": crop, "exposure_limits": (26, 66_666_666, None)}
                       for fmt, depth, size, fps, crop in _MODES[self._model]]
        native = max(self._modes, key=lambda mode: (mode["size"][0] * mode["size"][1], mode["bit_depth"]))
        self.sensor_resolution, self.sensor_format = native["size"], native["format"]
        self._controls = {"FrameDurationLimits": (33_333, 1_000_000_000, 33_333), "NoiseReductionMode": (0, 4, 0),
                          "ScalerCrop": ((0, 0, 64, 64), native["crop_limits"], native["crop_limits"])}
        self._sent, self._clock = 0, None

    @property
    def camera_properties(self):
        return {"Model": self._model, "ColorFilterArrangement": 0, "PixelArraySize": self.sensor_resolution}

    @property
    def camera_controls(self):
        return dict(self._controls)

    @property
    def sensor_modes(self):
        _call("sensor_modes")  # the real one configures the camera in each mode to measure it
        return [dict(mode) for mode in self._modes]

    def _configuration(self, main_default, controls_default, main, raw, controls, sensor, **rest):
        bad = set(main) - {"format", "size", "stride", "preserve_ar"}
        if bad:
            raise ValueError(f"Bad key {bad.pop()!r}: valid stream configuration keys are "
                             "('format', 'size', 'stride', 'preserve_ar')")
        main = {**main_default, **main}
        main["size"] = (main["size"][0] - main["size"][0] % 2, main["size"][1] - main["size"][1] % 2)
        if raw is not None:
            raw = {"format": self.sensor_format, "size": main["size"], **raw}
        return {**rest, "main": main, "raw": raw, "controls": {**controls_default, **controls}, "sensor": sensor}

    def create_preview_configuration(self, main={}, lores=None, raw={}, transform=None, colour_space=None,
                                     buffer_count=4, controls={}, display="main", encode="main", queue=True,
                                     sensor={}, use_case="preview"):
        return self._configuration(
            {"format": "XBGR8888", "size": (640, 480), "preserve_ar": True},
            {"NoiseReductionMode": 1, "FrameDurationLimits": (100, 83_333)}, main, raw, controls, sensor,
            use_case=use_case, transform=transform, colour_space=colour_space, buffer_count=buffer_count,
            queue=queue, lores=lores, display=display, encode=encode)

    def create_video_configuration(self, main={}, lores=None, raw={}, transform=None, colour_space=None,
                                   buffer_count=6, controls={}, display="main", encode="main", queue=True,
                                   sensor={}, use_case="video"):
        return self._configuration(
            {"format": "XBGR8888", "size": (1280, 720), "preserve_ar": True},
            {"NoiseReductionMode": 2, "FrameDurationLimits": (33_333, 33_333)}, main, raw, controls, sensor,
            use_case=use_case, transform=transform, colour_space=colour_space, buffer_count=buffer_count,
            queue=queue, lores=lores, display=display, encode=encode)

    def _nearest_mode(self, size, bit_depth):
        """The mode nearest `size`: same aspect ratio first, then size (falling short costs more than
        overshooting), then bit depth. An exact size is always chosen."""
        def cost(mode):
            width, height = mode["size"]
            aspect = abs(math.log((width / height) / (size[0] / size[1])))
            scale = abs(math.log(width / size[0])) + abs(math.log(height / size[1]))
            short = 1.0 if width < size[0] or height < size[1] else 0.0
            return 20 * aspect + scale + short + 0.05 * abs(mode["bit_depth"] - bit_depth)
        return min(self._modes, key=cost)

    def configure(self, camera_config=None):
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        config = {**camera_config, "main": dict(camera_config["main"])}
        sensor = config.get("sensor") or {}
        bad = set(sensor) - {"bit_depth", "output_size"}
        if bad:
            raise RuntimeError(f"Unexpected keys {bad} in sensor configuration")
        main = config["main"]
        if main["format"] not in _BYTES_PER_PIXEL and main["format"] != "YUV420":
            raise RuntimeError(f"Bad format {main['format']} in stream main")
        _call("configure", main["format"], main["size"], sensor, config["controls"].get("FrameDurationLimits"))
        if os.environ.get("STAND_IN_FAIL") == "configure":
            raise RuntimeError(f"Configuration failed: {config}")
        raw = config.get("raw") or {}
        wanted = sensor.get("output_size") or raw.get("size") or main["size"]
        raw_format = raw.get("format", "RAW10").split("_")[0]
        depth = sensor.get("bit_depth") or int("".join(c for c in raw_format if c.isdigit()))
        mode = self._nearest_mode(wanted, depth)
        _libcamera_log("INFO", f"Camera camera.cpp:1197 configuring streams: (0) {main['size'][0]}x{main['size'][1]}-"
                               f"{main['format']}")
        _libcamera_log("WARN", "RPiSdn sdn.cpp:40 Using legacy SDN tuning - please consider moving SDN inside "
                               "rpi.denoise")
        main["format"] = os.environ.get("STAND_IN_FORMAT", main["format"])
        width, height = main["size"]
        main["stride"] = -(-width * _BYTES_PER_PIXEL.get(main["format"], 1) // 64) * 64
        main["framesize"] = main["stride"] * height
        config["raw"] = {"format": mode["format"], "size": mode["size"]} if config.get("raw") is not None else None
        config["sensor"] = {"bit_depth": mode["bit_depth"], "output_size": mode["size"]}
        self._mode = mode
        self._controls["FrameDurationLimits"] = (round(1e6 / mode["fps"]), 1_000_000_000, round(1e6 / mode["fps"]))
        self._controls["ScalerCrop"] = ((0, 0, 64, 64), mode["crop_limits"], mode["crop_limits"])
        self.camera_config = config

    def start(self, config=None, show_preview=False):
        if not self.camera_config:
            raise RuntimeError("Camera has not been configured")
        _call("start")
        if os.environ.get("STAND_IN_FAIL") == "start":
            raise RuntimeError("Failed to start camera: Input/output error")
        limits = self.camera_config["controls"].get("FrameDurationLimits", (0, 0))
        self._frame_s = max(limits[0], 1e6 / self._mode["fps"]) / 1e6  # in good light: the shortest frame allowed
        self._clock, self.started = time.monotonic(), True

    def capture_array(self, name="main", wait=None):
        if not self.started:
            raise RuntimeError("stand-in: capture_array before start() would wait for ever")
        stall_after = os.environ.get("STAND_IN_STALL_AFTER")
        if stall_after is not None and self._sent >= int(stall_after):
            _stall_released.wait()
        newest = int((time.monotonic() - self._clock) / self._frame_s)
        if newest < self._sent:  # no frame completed since the last one returned: wait for the next
            time.sleep(max(0.0, self._clock + self._sent * self._frame_s - time.monotonic()))
            newest = self._sent
        self._sent = newest + 1
        config = self.camera_config[name]
        (width, height), layout, stride = config["size"], config["format"], config["stride"]
        rgb = scene(width, height, newest)
        pixels = {"BGR888": rgb, "RGB888": rgb[..., ::-1],
                  "XBGR8888": np.dstack([rgb, np.full((height, width), 255, np.uint8)]),
                  "XRGB8888": np.dstack([rgb[..., ::-1], np.full((height, width), 255, np.uint8)])}[layout]
        buffer = np.full((height, stride), 0xAA, np.uint8)  # the padding at each row's end holds junk
        buffer[:, :pixels.shape[1] * pixels.shape[2]] = pixels.reshape(height, -1)
        if os.environ.get("STAND_IN_PADDED"):
            return buffer
        return np.ascontiguousarray(buffer[:, :width * pixels.shape[2]].reshape(height, width, pixels.shape[2]))

    def stop(self):
        if self.started:
            _call("stop")
            self.started = False

    def close(self):
        if not self.is_open:
            return
        self.stop()
        _call("close")
        self.is_open, self.camera_config = False, {}


__all__ = ["Picamera2", "scene", "release"]
