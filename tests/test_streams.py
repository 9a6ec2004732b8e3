"""Streams (vim_rpi.streams and infer_rpi.py's --video, --paths-from, directories): a video written
by OpenCV here, a stand-in picamera2 module, slow test doubles for the model, and infer_rpi.py run
in subprocesses the way a user runs it. Every wait is bounded."""

import json
import os
import pathlib
import queue
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import vim_rpi
from vim_rpi import checkpoint_io, image_preprocess, streams
from vim_rpi.classifier import Classifier
from vim_rpi.errors import ImageError, SourceError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "vim" / "infer_rpi.py"
FRAMES, FPS, SIZE = 36, 24.0, (160, 120)  # the test video: 1.5 s of 160 x 120


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small random-weight 10-class checkpoint and two images."""
    root = tmp_path_factory.mktemp("streams")
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, img_size=64, num_classes=10)
    checkpoint_io.save_checkpoint(root / "small.pth", model)
    generator = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        Image.fromarray(generator.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture(scope="module")
def video(assets):
    """A short MJPG .avi of moving coloured shapes, written with OpenCV; returns (path, BGR frames
    as OpenCV reads them back)."""
    cv2 = pytest.importorskip("cv2")
    path = assets / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, SIZE)
    assert writer.isOpened()
    for i in range(FRAMES):
        frame = np.full((SIZE[1], SIZE[0], 3), (40, 90, 20), np.uint8)
        cv2.circle(frame, (15 + 3 * i, 60), 14, (0, 0, 255), -1)  # red, in OpenCV's BGR
        cv2.rectangle(frame, (100, 5 + 2 * i), (150, 35 + 2 * i), (255, 160, 0), -1)
        writer.write(frame)
    writer.release()
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == FRAMES
    return path, frames


def _start(processes, args, env=None, stdin=None):
    environment = dict(os.environ, **(env or {}))
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdin=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment)
    processes.append(process)
    return process


def _run(processes, args, env=None, timeout=60):
    process = _start(processes, args, env)
    out, err = process.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return process.returncode, out, err


def _json_lines(out):
    return [json.loads(line) for line in out.splitlines()]


def _line_reader(stream):
    """A queue that receives each line of `stream` as it arrives (None at its end)."""
    lines = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


# --- video files ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_video_file_json_lines_match_classifying_the_frames_as_images(assets, video, processes, one_thread):
    path, frames = video
    code, out, _ = _run(processes, ["--video", path, "--json", "-c", assets / "small.pth", "-t", "1", "-k", "3", "-q"])
    assert code == 0
    lines = _json_lines(out)
    assert len(lines) >= FRAMES // 2  # a tiny model keeps up with most of a 24 fps replay
    assert all(set(line) == {"frame", "t_s", "topk", "timing_ms"} for line in lines)
    indices = [line["frame"] for line in lines]
    assert indices == sorted(set(indices)) and indices[-1] == FRAMES - 1  # increasing; the last frame is seen
    times = [line["t_s"] for line in lines]
    assert times == sorted(times) and times[-1] < 5

    clf = Classifier(assets / "small.pth", warmup=False, tune_process=False)
    for line in lines:
        expected = clf.classify(streams.bgr_to_rgb(frames[line["frame"]]), 3).topk
        assert [e["index"] for e in line["topk"]] == [e["index"] for e in expected]
        assert [e["prob"] for e in line["topk"]] == pytest.approx([e["prob"] for e in expected], rel=1e-4)


def test_video_max_frames_and_text_lines(assets, video, processes):
    code, out, err = _run(processes, ["--video", video[0], "--max-frames", "4", "-c", assets / "small.pth", "-t", "1"])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4
    for line in lines:  # "   0.04 s  frame      1   11.57%  class 1  (3 ms)"
        seconds, _, frame, index, prob, *label = line.split()
        assert frame == "frame" and index.isdigit() and prob.endswith("%") and label[-1] == "ms)"
    assert "classified 4 of" in err


def test_frame_and_the_same_pixels_saved_as_png_give_identical_tensors(assets, video):
    cv2 = pytest.importorskip("cv2")
    path, frames = video
    source = streams.open_video(str(path))
    try:
        rgb = source.read()
    finally:
        source.close()
    png = assets / "frame0.png"
    cv2.imwrite(str(png), frames[0])  # OpenCV writes its BGR frame as a normal (RGB) PNG
    red, green, blue = rgb[60, 15].tolist()  # the circle's centre: red in RGB order
    assert red > 200 and blue < 80 and green < 80
    clf = Classifier(assets / "small.pth", warmup=False, tune_process=False)
    assert torch.equal(clf.preprocess(rgb), clf.preprocess(png))


@pytest.mark.slow
def test_missing_video_file_and_camera_index_are_one_line(assets, processes, tmp_path):
    pytest.importorskip("cv2")
    not_a_video = tmp_path / "notes.avi"
    not_a_video.write_text("not a video\n")
    for source, needle in ((tmp_path / "nope.mp4", "no such file"), (not_a_video, "cannot read this video"),
                           ("99", "camera 99"), (tmp_path, "a directory, not a regular file"),
                           ("99999999999999999999", "no such camera index"), ("²", "²: no such file")):
        code, out, err = _run(processes, ["--video", source, "-c", assets / "small.pth", "-q"])
        assert code == 4 and out == ""
        assert len(err.splitlines()) == 1 and needle in err, err


DAMAGED_AT, DAMAGED_COUNT = 20, 48


@pytest.fixture(scope="module")
def bad_videos(assets, video):
    """Videos that end badly: (an MPEG-4 .mp4 whose frame DAMAGED_AT lost its start code, the test
    .avi cut in half, a text file named .jpg); the .mp4 replays at 240 fps (0.2 s)."""
    cv2 = pytest.importorskip("cv2")
    good = assets / "good.mp4"
    writer = cv2.VideoWriter(str(good), cv2.VideoWriter_fourcc(*"mp4v"), 240.0, SIZE)
    if not writer.isOpened():
        pytest.skip("this OpenCV build writes no MPEG-4")
    for i in range(DAMAGED_COUNT):
        frame = np.full((SIZE[1], SIZE[0], 3), (40, 90, 20), np.uint8)
        cv2.circle(frame, (15 + 2 * i, 60), 14, (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    data = bytearray(good.read_bytes())
    starts = [i for i in range(len(data) - 3) if data[i:i + 4] == b"\x00\x00\x01\xb6"]  # one VOP start code per frame
    assert len(starts) == DAMAGED_COUNT
    data[starts[DAMAGED_AT]:starts[DAMAGED_AT] + 4] = bytes(4)  # the decoder no longer finds this frame
    damaged = assets / "damaged.mp4"
    damaged.write_bytes(data)
    whole = video[0].read_bytes()
    cut = assets / "cut.avi"
    cut.write_bytes(whole[: len(whole) // 2])
    text = assets / "text.jpg"
    text.write_text("not a video\n")
    return damaged, cut, text


def _read_all(path):
    """Every frame streams' OpenCV source reads from `path`: (count, the SourceError or None)."""
    source = streams.open_video(str(path))
    count = 0
    try:
        while source.read() is not None:
            count += 1
    except SourceError as error:
        return count, error
    finally:
        source.close()
    return count, None


def test_opencv_read_fails_alike_at_the_end_and_on_damage_and_the_source_tells_them_apart(bad_videos, video):
    cv2 = pytest.importorskip("cv2")
    damaged, cut, _ = bad_videos
    capture = cv2.VideoCapture(str(damaged))  # what the check rests on: False, then frames again
    try:
        assert all(capture.read()[0] for _ in range(DAMAGED_AT)) and not capture.read()[0] and capture.grab()
    finally:
        capture.release()
    count, error = _read_all(damaged)
    assert count == DAMAGED_AT and f"frame {DAMAGED_AT} of {DAMAGED_COUNT} could not be decoded" in str(error)
    count, error = _read_all(cut)
    assert 0 < count < FRAMES and f"the frames end at {count} of the {FRAMES} the file announces" in str(error)
    assert _read_all(video[0]) == (FRAMES, None)  # a whole file simply ends


def test_a_source_that_ends_before_its_first_frame_is_an_error():
    with pytest.raises(SourceError, match="fake: no frame could be read from it"):
        list(streams.LatestFrameStream(FakeSource(count=0, fps=100.0), lambda pixels: None))


@pytest.mark.slow
def test_bad_video_files_exit_4_with_one_line(assets, bad_videos, processes):
    damaged, cut, text = bad_videos
    for path, frames, needle in ((damaged, DAMAGED_AT, "could not be decoded"), (cut, None, "the frames end at"),
                                 (text, 0, "no frame could be read")):
        code, out, err = _run(processes, ["--video", path, "--json", "-c", assets / "small.pth", "-t", "1", "-q"])
        assert code == 4 and len(err.splitlines()) == 1 and needle in err and str(path) in err, err
        indices = [line["frame"] for line in _json_lines(out)]
        assert indices == sorted(indices)
        if frames is not None:  # the frames before the problem were classified, the newest of them last
            assert indices[-1] == frames - 1 if frames else indices == []


# --- the latest-frame loop -----------------------------------------------------------------------

class FakeSource:
    """`count` frames of (h, w, 3) at `fps` (paced by the stream's reader, like a file); then the
    end, or `error` raised when given."""

    live, name = False, "fake"

    def __init__(self, count, fps, shape=(480, 640, 3), error=None):
        self.count, self.fps, self.shape, self.error, self.sent, self.closed = count, fps, shape, error, 0, False

    def read(self):
        if self.sent == self.count:
            if self.error:
                raise self.error
            return None
        self.sent += 1
        return np.full(self.shape, self.sent % 256, np.uint8)  # a new allocation per frame

    def close(self):
        self.closed = True


def test_slow_model_on_a_fast_source_drops_frames_and_memory_stays_flat():
    """2 s of 50 fps frames (900 KB each) and a model that takes 0.2 s: about 10 are classified,
    always the newest, and at no time are more than a handful of frames alive."""
    source = FakeSource(count=100, fps=50.0)
    stream = streams.LatestFrameStream(source, lambda pixels: time.sleep(0.2) or pixels[0, 0, 0])
    tracemalloc.start()
    try:
        seen = [frame.index for frame, _ in stream]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 7 <= len(seen) <= 14, seen
    assert seen == sorted(seen) and seen[-1] == 99
    assert stream.frames_read == 100 and stream.holder.dropped >= 80 and source.closed
    assert 480 * 640 * 3 < peak < 6 * 480 * 640 * 3  # frames are traced; queued, the 100 would take 92 MB


def test_every_s_spaces_the_classifications():
    stream = streams.LatestFrameStream(FakeSource(count=100, fps=100.0, shape=(8, 8, 3)), lambda pixels: None,
                                       every_s=0.3)
    seen = [frame.index for frame, _ in stream]
    assert 3 <= len(seen) <= 6, seen  # 1 s of frames, one classification per 0.3 s (plus the last)


def test_max_frames_stops_the_reader():
    source = FakeSource(count=10_000, fps=1000.0, shape=(8, 8, 3))
    stream = streams.LatestFrameStream(source, lambda pixels: None, max_frames=3)
    assert len(list(stream)) == 3
    assert source.closed and source.sent < 10_000


def test_source_error_is_raised_after_the_last_frame():
    source = FakeSource(count=3, fps=100.0, shape=(8, 8, 3), error=SourceError("camera 0 stopped delivering frames"))
    seen = []
    with pytest.raises(SourceError, match="stopped delivering"):
        for frame, _ in streams.LatestFrameStream(source, lambda pixels: None):
            seen.append(frame.index)
    assert seen and seen[-1] == 2


def test_a_silent_camera_is_taken_as_gone():
    release = threading.Event()

    class Silent(FakeSource):
        live, fps = True, None

        def read(self):
            release.wait(10)  # a camera read that blocks: the device went away
            return None

    stream = streams.LatestFrameStream(Silent(count=0, fps=None), lambda pixels: None, camera_timeout_s=0.3)
    try:
        with pytest.raises(SourceError, match="no frame for 0.3 s"):
            list(stream)
    finally:
        release.set()


def test_latest_frame_holds_one_frame():
    holder = streams.LatestFrame()
    for i in range(3):
        holder.put(i)
    assert holder.take(0) == 2 and holder.dropped == 2
    with pytest.raises(TimeoutError):
        holder.take(0.01)
    holder.put(3)
    holder.finish(SourceError("gone"))
    assert holder.take(0) == 3
    with pytest.raises(SourceError):
        holder.take(0)


# --- paths: --paths-from and directories ---------------------------------------------------------

def test_paths_from_stdin_classifies_each_line_as_it_arrives(assets, processes, tmp_path):
    """A writer feeds paths over time: the first result comes before the next path is written,
    bad paths become error objects, the stream goes on, and results keep the input order."""
    (tmp_path / "notes.jpg").write_text("not an image\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "c.png").write_bytes((assets / "b.png").read_bytes())
    process = _start(processes, ["--paths-from", "-", "--json", "-c", assets / "small.pth", "-t", "1", "-k", "2", "-q"],
                     stdin=subprocess.PIPE)
    lines = _line_reader(process.stdout)
    process.stdin.write(f"{assets / 'a.jpg'}\n")
    process.stdin.flush()
    first = json.loads(lines.get(timeout=60))  # arrives while stdin is still open
    assert first["image"] == str(assets / "a.jpg") and len(first["topk"]) == 2
    later = [tmp_path / "missing.jpg", tmp_path / "notes.jpg", folder, assets / "b.png"]
    for path in later:
        time.sleep(0.1)
        process.stdin.write(f"{path}\n")
        process.stdin.flush()
    process.stdin.close()
    process.wait(timeout=60)
    rest = []
    while (line := lines.get(timeout=10)) is not None:
        rest.append(json.loads(line))
    assert process.returncode == 4  # some paths failed
    assert [r["image"] for r in rest] == [str(tmp_path / "missing.jpg"), str(tmp_path / "notes.jpg"),
                                          str(folder / "c.png"), str(assets / "b.png")]
    assert [set(r) for r in rest] == [{"image", "error"}] * 2 + [{"image", "topk", "timing_ms"}] * 2
    assert "no such file" in rest[0]["error"] and "not an image" in rest[1]["error"]
    assert rest[2]["topk"] == rest[3]["topk"]  # the same pixels
    assert len(process.stderr.read().splitlines()) == 2  # one line per failed path


def test_directories_and_recursive(assets, main_in_process, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "empty").mkdir()
    for name in ("b.PNG", "a.jpg", "sub/c.jpg"):
        (photos / name).write_bytes((assets / "a.jpg").read_bytes())
    (photos / "notes.txt").write_text("not an image\n")
    common = ["--json", "-c", assets / "small.pth", "-t", "1", "-q"]

    code, out, _ = main_in_process([photos, *common])
    assert code == 0
    assert [r["image"] for r in json.loads(out)["results"]] == [str(photos / "a.jpg"), str(photos / "b.PNG")]

    code, out, _ = main_in_process([photos, *common, "--recursive"])
    assert code == 0
    expected = [str(photos / name) for name in ("a.jpg", "b.PNG", "sub/c.jpg")]
    assert [r["image"] for r in json.loads(out)["results"]] == expected

    code, out, err = main_in_process([photos / "empty", *common])
    assert code == 4 and "no image files" in json.loads(out)["results"][0]["error"] and "--recursive" in err


def _permissions_apply():
    """A command prefix under which file permissions apply to a child process, or None when they
    cannot: nothing for a normal user; for root, setpriv without the capabilities that let root
    read and search anything (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if shutil.which("setpriv") and subprocess.run([*prefix, "true"]).returncode == 0:
        return prefix
    return None


@pytest.fixture
def awkward_paths(assets, tmp_path):
    """Paths with every problem a path can have, each with a word its error must contain, and a
    directory that holds such entries; returns (paths [(path, needle or None when it classifies)],
    directory, its entries in the expected order [(path, needle)], command prefix). Permission
    cases are left out where permissions cannot apply (root without setpriv)."""
    prefix = _permissions_apply()
    image = (assets / "a.jpg").read_bytes()
    (tmp_path / "good.jpg").write_bytes(image)
    os.mkfifo(tmp_path / "pipe.jpg")  # opened, it would wait forever for a writer
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    latin1 = tmp_path / os.fsdecode(b"caf\xe9.jpg")  # not UTF-8: a lone surrogate in Python
    latin1.write_bytes(image)
    paths = [(tmp_path / "good.jpg", None), (tmp_path / ("x" * 300 + ".jpg"), "name too long"),
             (tmp_path / "pipe.jpg", "FIFO"), (tmp_path / "dangling.jpg", "symbolic link to"),
             (latin1, None), (tmp_path / "missing.jpg", "no such file")]

    folder = tmp_path / "folder"
    (folder / "deeper").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(image)
    (folder / "deeper" / "b.jpg").write_bytes(image)
    os.mkfifo(folder / "pipe.png")
    (folder / "dangling.png").symlink_to("nowhere.png")
    (folder / "notes.txt").write_text("not an image, skipped\n")
    entries = [(folder / "a.jpg", None), (folder / "dangling.png", "symbolic link to"),
               (folder / "deeper" / "b.jpg", None), (folder / "pipe.png", "FIFO")]
    locked = []
    if prefix is not None:
        (tmp_path / "secret.jpg").write_bytes(image)
        (tmp_path / "closed").mkdir()
        (tmp_path / "closed" / "inside.jpg").write_bytes(image)
        (folder / "locked").mkdir()
        (folder / "locked" / "c.jpg").write_bytes(image)
        locked = [tmp_path / "secret.jpg", tmp_path / "closed", folder / "locked"]
        paths += [(tmp_path / "secret.jpg", "permission denied"),
                  (tmp_path / "closed" / "inside.jpg", "permission denied")]
        entries.insert(3, (folder / "locked", "cannot list this directory: permission denied"))
    for path in locked:
        path.chmod(0)
    yield paths, folder, entries, prefix or []
    for path in locked:
        path.chmod(0o700)


def _check_results(results, err, expected):
    """Each result is the expected image, classified or failed with its needle; one stderr line per failure."""
    assert [r["image"] for r in results] == [str(path) for path, _ in expected]
    for result, (path, needle) in zip(results, expected):
        if needle is None:
            assert set(result) == {"image", "topk", "timing_ms"}, result
        else:
            assert set(result) == {"image", "error"} and needle in result["error"], result
            assert result["error"].startswith(f"{path}: ")  # names the path, then the cause
    failures = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(failures) == len(err.splitlines()) == sum(needle is not None for _, needle in expected), err


def test_every_path_problem_is_one_failed_item_in_arguments_and_directories(assets, processes, awkward_paths):
    paths, folder, entries, prefix = awkward_paths
    process = subprocess.Popen([*prefix, sys.executable, str(SCRIPT), *(str(p) for p, _ in paths), str(folder),
                                "--recursive", "--json", "-c", str(assets / "small.pth"), "-t", "1", "-k", "1", "-q"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes.append(process)
    out, err = process.communicate(timeout=60)  # a FIFO that was opened would hang here
    assert process.returncode == 4 and "Traceback" not in err, err
    _check_results(json.loads(out)["results"], err, paths + entries)


@pytest.mark.slow
def test_every_path_problem_is_one_failed_item_in_paths_from(assets, processes, awkward_paths, tmp_path):
    paths, folder, entries, prefix = awkward_paths
    listing = b"".join(os.fsencode(path) + b"\n" for path, _ in paths) + os.fsencode(folder) + b"\n"
    (tmp_path / "list.txt").write_bytes(listing)
    for source in ("-", tmp_path / "list.txt"):
        process = subprocess.Popen([*prefix, sys.executable, str(SCRIPT), "--paths-from", str(source), "--recursive",
                                    "--json", "-c", str(assets / "small.pth"), "-t", "1", "-k", "1", "-q"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        processes.append(process)
        out, err = process.communicate(listing if source == "-" else b"", timeout=60)
        err = err.decode()
        assert process.returncode == 4 and "Traceback" not in err, err
        _check_results(_json_lines(out), err, paths + entries)


def test_a_path_holding_a_nul_byte_is_one_failed_item(assets, processes):
    """`find -print0` piped in by mistake: os.stat raises ValueError (not OSError) on a NUL byte;
    the line is one failed item and the stream goes on."""
    good = str(assets / "a.jpg")
    assert "NUL byte" in streams.image_paths(f"{good}\0{good}")[0].problem
    with pytest.raises(ImageError, match="NUL byte"):
        image_preprocess.load_image(f"{good}\0")
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--paths-from", "-", "--json", "-c",
                                str(assets / "small.pth"), "-t", "1", "-k", "1", "-q"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    processes.append(process)
    out, err = process.communicate(os.fsencode(f"{good}\0{good}\0\n{good}\n"), timeout=60)
    results, err = _json_lines(out), err.decode()
    assert process.returncode == 4 and "Traceback" not in err, err
    assert "NUL byte" in results[0]["error"] and set(results[1]) == {"image", "topk", "timing_ms"}, results


def test_a_missing_paths_from_file_is_reported_before_the_model_loads(processes, tmp_path):
    """The checkpoint is missing too: the --paths-from error (exit 4), not the checkpoint's (exit 3),
    shows that nothing was loaded first."""
    code, out, err = _run(processes, ["--paths-from", tmp_path / "list.txt", "-c", tmp_path / "missing.pth"])
    assert (code, out, err) == (4, "", f"error: --paths-from {tmp_path / 'list.txt'}: no such file\n")

def test_image_paths_never_raises_and_never_opens(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "linked_dir.jpg").symlink_to(tmp_path, target_is_directory=True)  # a directory: not descended
    too_long = str(tmp_path / ("y" * 300 + ".png"))
    under_a_file = str(tmp_path / "x.jpg" / "z.jpg")
    assert streams.image_paths(too_long) == [(too_long, f"{too_long}: name too long for the file system (usually at "
                                                        "most 255 bytes per file name, 4096 per path); check the path")]
    assert "is a file, not a directory" in streams.image_paths(under_a_file)[0].problem
    entries = streams.image_paths(tmp_path, True)
    assert [entry.path for entry in entries] == [str(tmp_path / name) for name in ("loop.jpg", "pipe.jpg", "x.jpg")]
    assert "too many levels of symbolic links" in entries[0].problem
    assert entries[1].problem == f"{tmp_path / 'pipe.jpg'}: a FIFO (named pipe), not a regular file; give the path of a file"
    assert entries[2].problem is None  # an empty file is the classifier's to report
    deep = bottom = tmp_path / "deep"
    for _ in range(600):
        bottom.mkdir()
        bottom = bottom / "d"
    (bottom.parent / "z.png").write_bytes(b"")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)  # a tree deeper than a recursive walk could go (pytest's cleanup still can)
    try:
        found = streams.image_paths(deep, True)
    finally:
        sys.setrecursionlimit(limit)
    assert len(found) == 1 and found[0] == (str(bottom.parent / "z.png"), None)


@pytest.mark.parametrize("args,needle", [
    (["a.jpg", "--video", "0"], "one kind of input"),
    (["--video", "0", "--paths-from", "-"], "one kind of input"),
    (["a.jpg", "--max-frames", "3"], "go with --video"),
    (["--video", "0", "--max-frames", "0"], "--max-frames"),
    (["--video", "0", "--every-s", "-1"], "--every-s"),
    (["--video", "0", "--recursive"], "do not go with --video"),
    (["--paths-from", "-", "--benchmark", "2"], "--benchmark"),
])
def test_stream_usage_errors_exit_2(args, needle, main_in_process):
    code, out, err = main_in_process(args)
    assert code == 2 and out == "" and needle in err.splitlines()[-1]
