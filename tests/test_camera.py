"""The Pi camera module (vim_rpi.streams.PiCameraSource, --video picam) through a stand-in picamera2
(tests/stand_ins/picamera2: the real one needs a Pi, a camera and libcamera), and cameras named by
device path (--video /dev/video2, /dev/v4l/by-id/...) through OpenCV. In-process where the
source is enough, in subprocesses where what a user sees (stderr, exit status) is the point.
Every wait is bounded."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vim_rpi
from vim_rpi import checkpoint_io, streams
from vim_rpi.classifier import Classifier
from vim_rpi.errors import ConfigError, SourceError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "vim" / "infer_rpi.py"
STAND_INS = pathlib.Path(__file__).resolve().parent / "stand_ins"

# Each sensor's full-field binned mode (rpicam-hello --list-cameras on a Pi 4) and the frames read
# from it: 480 rows, the mode's aspect ratio, the width a multiple of 32.
FULL_FIELD = {"imx219": ((1640, 1232), (640, 480)), "imx708": ((2304, 1296), (864, 480)),
              "imx477": ((2028, 1520), (640, 480)), "ov5647": ((640, 480), (640, 480))}
ARRAY = {"imx219": (3280, 2464), "imx708": (4608, 2592), "imx477": (4056, 3040), "ov5647": (2592, 1944)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random-weight 10-class checkpoint."""
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, img_size=64, num_classes=10)
    path = tmp_path_factory.mktemp("camera") / "small.pth"
    checkpoint_io.save_checkpoint(path, model)
    return path


class StandIn:
    """The stand-in picamera2, importable in this process: `env` sets its behaviour (the
    STAND_IN_* variables), `calls()` reads the calls it logged."""

    def __init__(self, monkeypatch, tmp_path):
        self.monkeypatch, self.log = monkeypatch, tmp_path / "calls.log"
        monkeypatch.syspath_prepend(str(STAND_INS))
        monkeypatch.delitem(sys.modules, "picamera2", raising=False)
        monkeypatch.delenv("LIBCAMERA_LOG_LEVELS", raising=False)  # PiCameraSource sets it for the process
        for name in [name for name in os.environ if name.startswith("STAND_IN_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("STAND_IN_LOG", str(self.log))

    def env(self, **settings):
        for name, value in settings.items():
            self.monkeypatch.setenv(f"STAND_IN_{name.upper()}", str(value))

    def calls(self):
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    helper = StandIn(monkeypatch, tmp_path)
    yield helper
    if "picamera2" in sys.modules and hasattr(sys.modules["picamera2"], "release"):
        sys.modules["picamera2"].release()  # frees a reader thread left blocked in a stalled capture_array


@pytest.fixture
def processes():
    """Started subprocesses, killed at teardown if a test left one running."""
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _start(processes, args, env):
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("STAND_IN_") and name != "LIBCAMERA_LOG_LEVELS"}
    environment.update(env, PYTHONPATH=str(STAND_INS))
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment)
    processes.append(process)
    return process


def _run(processes, args, env, timeout=90):
    process = _start(processes, args, env)
    out, err = process.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return process.returncode, out, err


def _calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def _scene(width, height):
    """What the stand-in camera shows, red and green channels (blue is flat, per frame): red rises
    from 0 at the left to 255 at the right, green from the top to the bottom."""
    red = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    green = np.tile(np.linspace(0, 255, height).round().astype(np.uint8)[:, None], (1, width))
    return red, green


# --- 1. the full field of view at a capped frame rate -------------------------------------------

@pytest.mark.parametrize("sensor", sorted(FULL_FIELD))
def test_reads_the_full_field_binned_mode_at_a_capped_frame_rate(stand_in, sensor):
    """Not the crop nearest 640x480 (IMX219: 1280x960 of 3280x2464 at 206 fps): the binned mode
    over the whole array, frames of its aspect ratio, at most PICAM_FPS (15) frames a second."""
    stand_in.env(sensor=sensor)
    source = streams.PiCameraSource()
    try:
        config = source._camera.camera_config
        mode = next(m for m in source._camera.sensor_modes if tuple(m["size"]) == config["sensor"]["output_size"])
        frame = source.read()
    finally:
        source.close()
    assert (source.mode, (frame.shape[1], frame.shape[0])) == FULL_FIELD[sensor]
    assert config["sensor"]["output_size"] == FULL_FIELD[sensor][0]
    x, y, width, height = mode["crop_limits"]
    assert width >= 0.98 * ARRAY[sensor][0] and height >= 0.98 * ARRAY[sensor][1]  # the whole pixel array
    assert config["controls"]["FrameDurationLimits"] == (66_667, 83_333)  # 15 fps at most; 12 in the dark
    assert source.shape == frame.shape and frame.dtype == np.uint8


@pytest.mark.parametrize("fps,limits", [(5, (200_000, 200_000)), (30, (33_333, 83_333)), (2.5, (400_000, 400_000))])
def test_max_fps_sets_the_frame_duration_limits(stand_in, fps, limits):
    source = streams.PiCameraSource(max_fps=fps)
    source.close()
    assert stand_in.calls()[2] == ["configure", "BGR888", [640, 480], {"output_size": [1640, 1232], "bit_depth": 10},
                                   list(limits)]


def test_a_chosen_sensor_mode_is_read_and_an_unknown_one_is_one_line(stand_in):
    source = streams.PiCameraSource(mode=(1920, 1080))  # a 16:9 crop, at the user's request
    try:
        frame = source.read()
    finally:
        source.close()
    assert source._camera.camera_config == {} and source.mode == (1920, 1080)
    assert frame.shape == (480, 864, 3)  # 1920 / 1080 * 480 = 853, to a multiple of 32
    assert stand_in.calls()[2][3] == {"output_size": [1920, 1080], "bit_depth": 10}  # the 10-bit of the two

    with pytest.raises(SourceError) as error:
        streams.PiCameraSource(mode=(1234, 567))
    assert str(error.value) == ("Pi camera (imx219) has no sensor mode 1234x567 (--picam-mode); its modes: "
                                "640x480, 1640x1232, 1920x1080, 3280x2464")
    assert stand_in.calls()[-1] == ["close"]  # opened, then closed on the failure


def _random_modes(generator):
    """A random sensor: a pixel array, full-field modes (binned or not) and centre crops."""
    array = (int(generator.integers(800, 5000)) // 2 * 2, int(generator.integers(600, 4000)) // 2 * 2)
    modes = []
    for _ in range(int(generator.integers(1, 7))):
        scale = float(generator.choice([1, 2, 3, 4, 0.5]))
        crop = array if generator.random() < 0.5 else (int(array[0] * generator.uniform(0.3, 0.9)),
                                                       int(array[1] * generator.uniform(0.3, 0.9)))
        size = (max(2, int(crop[0] / scale) // 2 * 2), max(2, int(crop[1] / scale) // 2 * 2))
        modes.append({"size": size, "bit_depth": int(generator.choice([8, 10, 12])), "fps": 30.0,
                      "crop_limits": ((array[0] - crop[0]) // 2, (array[1] - crop[1]) // 2, *crop)})
    return modes


def test_choose_sensor_mode_on_random_sensors():
    """Against the rule spelled out: among the modes whose crop spans >= 95 % of the largest crop both
    ways, the smallest at least 480 rows tall (highest bit depth first), else the largest."""
    generator = np.random.default_rng(22)
    for _ in range(300):
        modes = _random_modes(generator)
        chosen = streams.choose_sensor_mode(modes)
        biggest = max(modes, key=lambda m: m["crop_limits"][2] * m["crop_limits"][3])["crop_limits"]
        full = [m for m in modes
                if m["crop_limits"][2] >= 0.95 * biggest[2] and m["crop_limits"][3] >= 0.95 * biggest[3]]
        assert chosen in full
        area = chosen["size"][0] * chosen["size"][1]
        tall = [m for m in full if m["size"][1] >= 480]
        if tall:
            assert chosen["size"][1] >= 480
            assert all(area < m["size"][0] * m["size"][1] or (area == m["size"][0] * m["size"][1]
                                                              and chosen["bit_depth"] >= m["bit_depth"]) for m in tall)
        else:
            assert all(area >= m["size"][0] * m["size"][1] for m in full)


def test_choose_sensor_mode_edges():
    assert streams.choose_sensor_mode([]) is None
    assert streams.choose_sensor_mode([{"format": "MJPEG"}]) is None  # not a raw sensor: nothing to choose
    small = [{"size": (320, 240), "bit_depth": 10, "fps": 90.0, "crop_limits": (0, 0, 640, 480)},
             {"size": (160, 120), "bit_depth": 10, "fps": 90.0, "crop_limits": (0, 0, 640, 480)}]
    assert streams.choose_sensor_mode(small)["size"] == (320, 240)  # none 480 tall: the largest
    with pytest.raises(SourceError, match="no sensor mode 640x480 .* its modes: 160x120, 320x240$"):
        streams.choose_sensor_mode(small, (640, 480), "Pi camera")
    with pytest.raises(SourceError, match="its modes: none$"):
        streams.choose_sensor_mode([], (640, 480))


# --- 2. the configuration and frames checked ----------------------------------------------------

def test_a_configuration_other_than_the_one_asked_for_is_one_line_and_closes_the_camera(stand_in):
    stand_in.env(format="XBGR8888")  # as if libcamera had adjusted the stream
    with pytest.raises(SourceError) as error:
        streams.PiCameraSource()
    assert str(error.value) == ("Pi camera (imx219) was configured for XBGR8888 frames, not BGR888 (RGB): this "
                                "picamera2 or libcamera does not deliver what vim_rpi reads")
    assert [call[0] for call in stand_in.calls()] == ["Picamera2", "sensor_modes", "configure", "close"]


def test_a_sensor_mode_other_than_the_one_asked_for_is_one_line(stand_in, monkeypatch):
    import picamera2

    def the_crop(camera, size, bit_depth):  # as if libcamera had chosen the mode nearest 640x480
        return next(mode for mode in camera._modes if mode["size"] == (640, 480))

    monkeypatch.setattr(picamera2.Picamera2, "_nearest_mode", the_crop)
    with pytest.raises(SourceError, match=r"^Pi camera \(imx219\) runs sensor mode 640x480, not the 1640x1232 "
                                          r"asked for$"):
        streams.PiCameraSource()
    assert stand_in.calls()[-1] == ["close"]


def test_a_frame_of_another_shape_is_one_line(stand_in):
    stand_in.env(padded=1)  # rows with their padding, as if picamera2 had not trimmed them
    source = streams.PiCameraSource()
    try:
        with pytest.raises(SourceError) as error:
            source.read()
    finally:
        source.close()
    assert str(error.value) == ("Pi camera (imx219) delivered a uint8 frame of shape (480, 1920), not the "
                                "configured uint8 (480, 640, 3)")


@pytest.mark.parametrize("failing", ["configure", "start"])
def test_the_camera_is_closed_when_configure_or_start_fails(stand_in, failing):
    stand_in.env(fail=failing)
    with pytest.raises(SourceError) as error:
        streams.PiCameraSource()
    expected = {"configure": "Configuration failed", "start": "Failed to start camera: Input/output error"}[failing]
    assert str(error.value) == f"Pi camera (imx219) could not be started: {expected}"
    assert stand_in.calls()[-1] == ["close"]


# --- 3. errors that say what is wrong and what to do --------------------------------------------

@pytest.mark.parametrize("sensor,needle", [
    ("none", "no camera module found: `rpicam-hello --list-cameras` should list it; if it does not, power off "
             "and reseat the ribbon cable"),
    ("usb", "libcamera finds no camera module, only a USB camera: read that with --video N"),
])
def test_no_camera_module_says_how_to_check(stand_in, sensor, needle):
    stand_in.env(sensor=sensor)
    with pytest.raises(SourceError) as error:
        streams.PiCameraSource()
    assert str(error.value).startswith(needle) and "list index" not in str(error.value)
    assert stand_in.calls() == []  # never opened


def test_no_camera_for_a_user_outside_the_video_group(stand_in, monkeypatch, tmp_path):
    (tmp_path / "media0").write_text("")
    monkeypatch.setattr(streams, "_MEDIA_DEVICES", str(tmp_path / "media*"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a user without the right (root has it)
    stand_in.env(sensor="none")
    with pytest.raises(SourceError, match=r"may not open .*media0 \(libcamera needs the video group\): "
                                          r"sudo usermod -aG video \$USER"):
        streams.PiCameraSource()


@pytest.fixture
def lock_holder(tmp_path):
    """A process holding a POSIX lock (lockf, as libcamera locks a camera's media devices) on
    tmp_path/media0; yields it."""
    device = tmp_path / "media0"
    device.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(device)!r}, 'r+'); fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_busy_camera_names_the_process_that_holds_it(stand_in, monkeypatch, tmp_path, lock_holder):
    monkeypatch.setattr(streams, "_MEDIA_DEVICES", str(tmp_path / "media*"))
    stand_in.env(busy=1)
    with pytest.raises(SourceError) as error:
        streams.PiCameraSource()
    message = str(error.value)
    assert message.startswith(f"the Pi camera is in use by pid {lock_holder.pid} ({sys.executable} -c): ")
    assert message.endswith(f"close it, or end it: kill {lock_holder.pid}")
    assert "__init__ sequence" not in message and "ribbon" not in message


def test_a_busy_camera_with_no_holder_found_says_how_to_find_it(stand_in, monkeypatch, tmp_path):
    monkeypatch.setattr(streams, "_MEDIA_DEVICES", str(tmp_path / "media*"))
    stand_in.env(busy=1)
    with pytest.raises(SourceError, match=r"in use by another program \(an rpicam or libcamera app, a picamera2 "
                                          r"script, .*\); `sudo fuser -v /dev/media\*` names it$"):
        streams.PiCameraSource()


def test_lock_holders_from_proc_locks(tmp_path):
    """Only granted locks on the media devices count: not waiters ("->"), OFD locks (pid -1), other
    files, this process, or lines that do not parse."""
    devices = [tmp_path / "media0", tmp_path / "media1", tmp_path / "other"]
    for path in devices:
        path.write_text("")
    keys = []
    for path in devices:
        status = os.stat(path)
        keys.append(f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}")
    locks = tmp_path / "locks"
    locks.write_text(f"1: POSIX  ADVISORY  WRITE 4242 {keys[0]} 0 EOF\n"
                     f"1: -> POSIX  ADVISORY  WRITE 5353 {keys[0]} 0 EOF\n"
                     f"2: OFDLCK ADVISORY  WRITE -1 {keys[1]} 0 EOF\n"
                     f"3: POSIX  ADVISORY  WRITE 6464 {keys[2]} 0 EOF\n"
                     f"4: POSIX  ADVISORY  WRITE {os.getpid()} {keys[1]} 0 EOF\n"
                     f"5: POSIX  ADVISORY  WRITE 4242 {keys[1]} 0 EOF\n"
                     "6: garbage\n7: POSIX ADVISORY WRITE notapid 00:00:1 0 EOF\n"
                     f"8: FLOCK  ADVISORY  WRITE 7575 {keys[1]} 0 EOF\n")
    assert streams._camera_lock_holders(str(tmp_path / "media*"), locks) == [4242, 7575]
    assert streams._camera_lock_holders(str(tmp_path / "media*"), tmp_path / "absent") == []


PROGRAM = "pid 812: /usr/bin/motion -n"


@pytest.mark.parametrize("cgroup,who,how", [
    ("0::/system.slice/motion.service\n", f"the service motion.service ({PROGRAM})",
     "stop it: sudo systemctl stop motion.service"),
    ("0::/user.slice/user-1000.slice/user@1000.service/session.slice/wireplumber.service\n",
     f"the user service wireplumber.service ({PROGRAM})", "stop it: systemctl --user stop wireplumber.service"),
    ("12:name=systemd:/system.slice/camera-app.service\n0::/\n", f"the service camera-app.service ({PROGRAM})",
     "stop it: sudo systemctl stop camera-app.service"),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", "pid 812 (/usr/bin/motion -n)",
     "close it, or end it: kill 812"),
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-1.scope\n",
     "pid 812 (/usr/bin/motion -n)", "close it, or end it: kill 812"),
])
def test_describe_the_process_that_holds_the_camera(tmp_path, cgroup, who, how):
    (tmp_path / "812").mkdir()
    (tmp_path / "812" / "cmdline").write_bytes(b"/usr/bin/motion\0-n\0-c\0/etc/motion.conf\0")
    (tmp_path / "812" / "cgroup").write_text(cgroup)
    assert streams._describe_process(812, tmp_path) == (who, how)
    assert streams._describe_process(999, tmp_path) == ("pid 999 (a process that has ended)",
                                                        "close it, or end it: kill 999")


# --- 5. colour order and a stalled camera -------------------------------------------------------

def test_red_green_and_blue_reach_the_model_input_in_rgb_order(stand_in, checkpoint, one_thread):
    """Distinct R, G and B values in the scene come out of the source and through preprocessing in
    RGB order; requesting RGB888 for BGR888, or adding a channel swap, would fail this. The IMX708's
    864-pixel rows are padded in the camera's buffer (2592 bytes to a 2624-byte stride)."""
    stand_in.env(sensor="imx708")
    clf = Classifier(checkpoint, warmup=False, tune_process=False)
    source = streams.PiCameraSource()
    seen = []
    stream = streams.LatestFrameStream(source, lambda pixels: seen.append(pixels) or clf.preprocess(pixels),
                                       max_frames=2)
    inputs = [x for _, x in stream]
    red, green = _scene(864, 480)
    for pixels, x in zip(seen, inputs):
        assert np.array_equal(pixels[..., 0], red) and np.array_equal(pixels[..., 1], green)
        assert len(np.unique(pixels[..., 2])) == 1 and pixels[0, 0, 2] not in (0, 255)
        assert torch.equal(x, clf.preprocess(Image.fromarray(pixels)))  # exactly like the same pixels from a file
        # The model's input (3, 224, 224), mean/std normalised: channel 0 rises left to right,
        # channel 1 top to bottom, channel 2 is flat.
        assert x[0, :, -1].mean() - x[0, :, 0].mean() > 1.5 and (x[0, 5] - x[0, 5].mean()).abs().max() > 1
        assert x[1, -1, :].mean() - x[1, 0, :].mean() > 1.5 and (x[1, :, 5] - x[1, :, 5].mean()).abs().max() > 1
        assert x[2].max() - x[2].min() < 1e-5
        assert torch.allclose(x[0, 0, :], x[0, -1, :], atol=1e-5)  # red does not change down a column
        assert torch.allclose(x[1, :, 0], x[1, :, -1], atol=1e-5)  # green does not change along a row
    assert source._camera.camera_config == {}  # the stream closed it


def test_a_stalled_camera_blocks_and_the_watchdog_reports_it(stand_in):
    """Like the real picamera2, a camera whose requests stop completing blocks in capture_array;
    the stream's watchdog is what the user sees."""
    stand_in.env(stall_after=2)
    source = streams.PiCameraSource()
    stream = streams.LatestFrameStream(source, lambda pixels: None, camera_timeout_s=0.5)
    seen = []
    with pytest.raises(SourceError, match=r"^Pi camera \(imx219\) delivered no frame for 0.5 s"):
        for frame, _ in stream:
            seen.append(frame.index)
    assert seen == [0, 1] and stream.frames_read == 2


# --- what a user sees: infer_rpi.py --video picam -----------------------------------------------

def test_video_picam_end_to_end_without_libcamera_noise(checkpoint, processes, tmp_path):
    """The stand-in writes libcamera's INFO and WARN lines to stderr unless LIBCAMERA_LOG_LEVELS
    silences them: stderr holds only infer_rpi.py's own lines."""
    log = tmp_path / "calls.log"
    code, out, err = _run(processes, ["--video", "picam", "--json", "--max-frames", "3", "-c", checkpoint, "-t", "1"],
                          {"STAND_IN_LOG": str(log)})
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3 and [line["frame"] for line in lines] == sorted({line["frame"] for line in lines})
    assert "Pi camera (imx219): sensor mode 1640x1232, 640x480 frames, at most 15 per second" in err.splitlines()
    assert not [line for line in err.splitlines() if ".cpp:" in line or "picamera2" in line], err
    assert _calls(log) == [["Picamera2", 0], ["sensor_modes"],
                           ["configure", "BGR888", [640, 480], {"output_size": [1640, 1232], "bit_depth": 10},
                            [66_667, 83_333]], ["start"], ["stop"], ["close"]]


@pytest.mark.parametrize("env,expected", [
    ({"STAND_IN_SENSOR": "none"}, "error: no camera module found: `rpicam-hello --list-cameras` should list it"),
    ({"STAND_IN_BUSY": "1"}, "error: the Pi camera is in use by another program"),
    ({"STAND_IN_FAIL": "start"}, "error: Pi camera (imx219) could not be started: Failed to start camera"),
])
def test_camera_failures_are_one_line_and_status_4(checkpoint, processes, tmp_path, env, expected):
    """One line on stderr: no libcamera log, no picamera2 logger record ("Camera __init__ sequence
    did not complete.")."""
    code, out, err = _run(processes, ["--video", "picam", "-c", checkpoint],
                          {"STAND_IN_LOG": str(tmp_path / "log"), **env})
    assert code == 4 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(expected), err


def test_picam_options(checkpoint, processes, tmp_path):
    log = tmp_path / "calls.log"
    code, _, _ = _run(processes, ["--video", "picam", "--picam-fps", "4", "--picam-mode", "3280x2464", "--max-frames",
                                  "1", "-c", checkpoint, "-t", "1", "-q"], {"STAND_IN_LOG": str(log)})
    assert code == 0
    assert _calls(log)[2] == ["configure", "BGR888", [640, 480], {"output_size": [3280, 2464], "bit_depth": 10},
                              [250_000, 250_000]]


@pytest.mark.parametrize("args,needle", [
    (["--video", "0", "--picam-fps", "5"], "--picam-fps and --picam-mode go with --video picam"),
    (["--video", "clip.mp4", "--picam-mode", "640x480"], "--picam-fps and --picam-mode go with --video picam"),
    (["--video", "picam", "--picam-fps", "0"], "--picam-fps must be in (0, 1000], got 0"),
    (["--video", "picam", "--picam-fps", "nan"], "--picam-fps must be in (0, 1000], got nan"),
    (["--video", "picam", "--picam-mode", "640"], "expected WIDTHxHEIGHT, such as 1640x1232, got '640'"),
    (["--video", "picam", "--picam-mode", "0x480"], "expected WIDTHxHEIGHT"),
])
def test_picam_option_usage_errors_exit_2(args, needle, main_in_process):
    code, out, err = main_in_process(args)
    assert code == 2 and out == "" and needle in err.splitlines()[-1]


def test_ctrl_c_ends_a_camera_stream_cleanly(checkpoint, processes, tmp_path):
    log = tmp_path / "calls.log"
    process = _start(processes, ["--video", "picam", "--json", "-c", checkpoint, "-t", "1"], {"STAND_IN_LOG": str(log)})
    first = process.stdout.readline()  # blocks until the first result (bounded by the teardown kill)
    json.loads(first)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)
    err = process.stderr.read()
    assert process.returncode == 0 and "Traceback" not in err and "stopped" in err
    assert _calls(log)[-2:] == [["stop"], ["close"]]


# --- 6. picamera2 missing or broken -------------------------------------------------------------

def test_missing_picamera2_says_what_to_do(checkpoint, processes, tmp_path):
    process = subprocess.run([sys.executable, str(SCRIPT), "--video", "picam", "-c", str(checkpoint)],
                             capture_output=True, text=True, timeout=90,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if process.returncode == 0:
        pytest.skip("a real picamera2 is installed here")
    assert process.returncode == 2 and process.stdout == "" and "python3-picamera2" in process.stderr.splitlines()[-1]

    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    system = tmp_path / "dist-packages"
    (system / "picamera2").mkdir(parents=True)
    advice = streams.picamera2_help(str(venv), "/usr", system)
    assert "apt install" not in advice and "setup_rpi.sh --system-site-packages" in advice
    advice = streams.picamera2_help(str(venv), "/usr", tmp_path / "nothing")
    assert advice.startswith("install it: sudo apt install python3-picamera2; then ")
    assert "--system-site-packages" in advice
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = true\n")
    assert streams.picamera2_help(str(venv), "/usr", tmp_path / "nothing") == (
        "install it: sudo apt install python3-picamera2")
    assert "does not import" in streams.picamera2_help("/usr", "/usr", system)


def _broken_picamera2(monkeypatch, tmp_path, body):
    (tmp_path / "picamera2").mkdir(parents=True)
    (tmp_path / "picamera2" / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    monkeypatch.delenv("LIBCAMERA_LOG_LEVELS", raising=False)


def test_picamera2_broken_by_the_venv_numpy_names_the_fix(monkeypatch, tmp_path, capsys):
    """bookworm's simplejpeg (built against numpy 1.24) under the venv's numpy 2: the error says to
    re-run set-up with --system-site-packages, which removes the venv's numpy."""
    _broken_picamera2(monkeypatch, tmp_path, 'raise ValueError("numpy.dtype size changed, may indicate binary '
                                             'incompatibility. Expected 96 from C header, got 88 from PyObject")\n')
    with pytest.raises(ConfigError) as error:
        streams.PiCameraSource()
    message = str(error.value)
    assert message.startswith("--video picam: picamera2 fails to import (ValueError: numpy.dtype size changed")
    assert f"numpy {np.__version__} in {pathlib.Path(np.__file__).parent.parent} hides" in message
    assert message.endswith("run: bash scripts/setup_rpi.sh --system-site-packages (it removes that numpy from "
                            "the venv)")


def test_picamera2_failing_to_import_is_one_line_whatever_it_prints(monkeypatch, tmp_path, capsys):
    """numpy 2 prints a page (and a stack) to stderr before a module built for numpy 1 fails with
    an ImportError: that is not "picamera2 is not installed", and the page is not shown."""
    _broken_picamera2(monkeypatch, tmp_path, "import sys\nsys.stderr.write('A module that was compiled using NumPy "
                                             "1.x cannot be run in\\nNumPy 2.2.6 as it may crash.\\n')\n"
                                             "raise ImportError('numpy.core.multiarray failed to import')\n")
    with pytest.raises(ConfigError, match=r"^--video picam: picamera2 fails to import \(ImportError: numpy.core."
                                          r"multiarray failed to import\): .*setup_rpi.sh --system-site-packages"):
        streams.PiCameraSource()
    assert capsys.readouterr().err == ""
    _broken_picamera2(monkeypatch, tmp_path / "other", "import libcamera_missing_here\n")
    with pytest.raises(ConfigError, match=r"fails to import \(ModuleNotFoundError: No module named "
                                          r"'libcamera_missing_here'\); run `python3 -c 'import picamera2'`"):
        streams.PiCameraSource()
    monkeypatch.setitem(sys.modules, "picamera2", None)  # what an absent module looks like to import
    with pytest.raises(ConfigError, match="needs picamera2"):
        streams.PiCameraSource()


# --- 4. cameras by device path (OpenCV) ---------------------------------------------------------

def test_device_paths_are_opened_as_cameras(checkpoint, processes, tmp_path):
    """/dev/video2 and /dev/v4l/by-id/... name cameras: OpenCV's V4L2 backend opens them (here a
    character device that is not a camera, /dev/null, so opening fails), not "no such file"."""
    pytest.importorskip("cv2")
    by_id = tmp_path / "usb-046d_HD_Pro_Webcam_C920-video-index0"
    by_id.symlink_to("/dev/null")
    for source, expected in (("/dev/null", "error: camera /dev/null could not be opened: in use by another program, "
                                           "or not a video capture device"),
                             (by_id, f"error: camera {by_id} (/dev/null) could not be opened: in use by another "
                                     "program, or not a video capture device")):
        code, out, err = _run(processes, ["--video", source, "-c", checkpoint, "-q"], {})
        assert code == 4 and out == "" and err.splitlines() == [expected]
    with pytest.raises(SourceError, match=r"^camera /dev/v4l/by-id/usb-gone-video-index0 could not be opened: "
                                          r"no such device$"):
        streams.OpenCVSource("/dev/v4l/by-id/usb-gone-video-index0")


@pytest.mark.parametrize("spec,node", [(0, "unicam-image"), ("/dev/null", "rp1-cfe-csi2-ch0"),
                                       (11, "bcm2835-codec-encode")])
def test_nodes_of_the_pis_own_hardware_are_refused_with_a_way_out(monkeypatch, tmp_path, spec, node):
    """On a Pi with a camera module its receiver takes /dev/video0-7: `--video 0` is then not a webcam."""
    pytest.importorskip("cv2")
    name = "null" if spec == "/dev/null" else f"video{spec}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "name").write_text(node + "\n")
    monkeypatch.setattr(streams, "_V4L2_SYSFS", tmp_path)
    with pytest.raises(SourceError) as error:
        streams.OpenCVSource(spec)
    message = str(error.value)
    assert f" is {node}, a node of the Pi's own camera or codec hardware, not a webcam: use --video picam" in message
    assert "`v4l2-ctl --list-devices`" in message
