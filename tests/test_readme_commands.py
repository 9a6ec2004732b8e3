"""Every command in the bash code blocks of README.md and README.zh-CN.md works as written.

The commands are read from both READMEs (lines ending in a backslash joined, `# comments`
dropped, the union of distinct commands, README.md's order first), and each is matched against
two explicit tables: SKIP (with the reason it cannot run here) and RUN (how it runs and what its
output must show). A command in neither table fails, so a new README command is never ignored
silently; the skipped ones are reported by pytest with their reasons (`-rs`).

RUN commands run with `bash -o pipefail -c COMMAND` (a pipe's producer must exit 0 too) in a
sandbox laid out like a fresh clone after the README's set-up: symbolic links `vim/` and
`scripts/` to this checkout and `.venv` to the virtual environment running the tests, plus the
files the commands name (below). They run in README order, as a user follows it; a command that
needs an earlier one (HF_HUB_OFFLINE needs the Hub cache filled, the curl lines the server,
`--resume out/...` the fine-tuning run) runs that one first when it has not run yet.

Weights: the Hub is unreachable, so scripts/fresh_pi/fake_hub.py (the fresh-Pi check's loopback
stand-in of the Hub's file endpoint) serves released-layout checkpoints (`{"model": state_dict}`,
full-size models from `vim_rpi.create_model` with seeded random weights) at the released
repository and file names of Vim-Tiny and Vim-Small. Every command gets HF_ENDPOINT set to it,
HF_HOME and HOME in the sandbox (so neither the user's Hub cache nor ~/.cache/vim-rpi is read),
and no HF_*, VIM_*, CAUSAL_CONV1D_* or SELECTIVE_SCAN_* variable of the test run.

Substitutions (the only changes made to a command before it runs):

| in the README | here | why |
| --- | --- | --- |
| `HF_ENDPOINT=https://hf-mirror.com` | `HF_ENDPOINT=http://127.0.0.1:HUB` | the loopback Hub stand-in |
| `vim/serve_rpi.py` (port 8000 by default) | `... --port PORT` | a free port |
| `localhost:8000` (curl) | `localhost:PORT` | the same port |
| `/path/to/imagenet` | `DIR` | the small ImageFolder tree below |

Files the commands name, created in the sandbox: `cat.jpg`, `photo.jpg` (JPEG) and `dog.png`
(PNG), small images drawn with PIL; `photos/` (two JPEGs, one in a sub-directory, and a PNG that
`find -name '*.jpg'` leaves out); `clip.mp4` (CLIP_FRAMES frames written with OpenCV);
`incoming/` (empty; the inotifywait pipeline watches it while the test writes into it); `DIR`,
an ImageFolder tree of 2 classes (`DIR/train/<class>/`, 1 image each, and `DIR/val/<class>/`,
2 each; main.py evaluates on val/ and trains on train/).

jq, inotifywait (apt: jq, inotify-tools) and curl are required: .ci/run installs them.
"""

import argparse
import json
import math
import os
import pathlib
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
READMES = ("README.md", "README.zh-CN.md")
FAKE_HUB = ROOT / "scripts" / "fresh_pi" / "fake_hub.py"
LABELS = (ROOT / "vim" / "data" / "imagenet1k_labels.txt").read_text(encoding="utf-8").splitlines()
SAMPLE = ROOT / "vim" / "data" / "sample.jpg"

# model (as -m/--model spells it) -> full registered name, released repository and file
RELEASED = {
    "vim_tiny": ("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                 "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_small": ("vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                  "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
}
DEFAULT_MODEL = "vim_tiny"
CLIP_FRAMES = 8
CLASSES = ("cats", "dogs")
TRAIN_PER_CLASS, VAL_PER_CLASS = 1, 2
TIMEOUT_S = 300  # one command; a command on a busy 2-core machine takes 5-60 s
TRAIN_TIMEOUT_S = 600
READY_TIMEOUT_S = 180


# ---------------------------------------------------------------- the READMEs' commands

def _clean(line: str) -> str:
    """`line` without its `# comment` (a # that starts a word outside quotes), with each run of
    white space outside quotes made one space (so the READMEs' column alignment does not count)."""
    words, quote, previous = [], None, " "
    for ch in line:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and previous.isspace():
            break
        elif ch.isspace():
            if not previous.isspace():
                words.append(" ")
            previous = ch
            continue
        words.append(ch)
        previous = ch
    return "".join(words).strip()


def bash_commands(text: str) -> list:
    """The commands of the ```bash blocks of a Markdown text, in order."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].strip() + " "
                continue
            command = _clean(pending + line.strip())
            pending = ""
            if command:
                commands.append(command)
    return commands


def readme_commands() -> list:
    """The distinct commands of both READMEs: README.md's in order, then the others'."""
    commands = []
    for name in READMES:
        for command in bash_commands((ROOT / name).read_text(encoding="utf-8")):
            if command not in commands:
                commands.append(command)
    return commands


COMMANDS = readme_commands()


# ---------------------------------------------------------------- what runs and what is skipped

SKIP = [
    (r"--video (\d+|/dev/\S+|picam)( |$)", "needs a camera (a V4L2 device or the Pi camera module)"),
    (r"(^|[|&;]\s*)sudo ", "needs root and changes this machine (apt, /etc, systemd)"),
    (r"^journalctl ", "reads the log of the systemd unit that the sudo lines install"),
    (r"\bscripts/setup_rpi\.sh\b", "the set-up itself: scripts/ci_fresh_pi.sh (run by .ci/run) runs it on fresh "
                                   "bookworm and trixie arm64 systems"),
    (r"^python3 -m venv \.venv$|^\.venv/bin/pip install ", "the test install: .ci/run does it on a fresh clone"),
    (r"-m pytest\b", "the test command: .ci/run runs it (here it would run this test again)"),
]


@dataclass
class Result:
    command: str  # as run, after the substitutions
    returncode: int
    stdout: str
    stderr: str
    hub_requests: list = field(default_factory=list)  # the stand-in Hub's log lines during the run
    cached_before: set = field(default_factory=set)  # released files in the Hub cache before the run

    def describe(self):
        return (f"$ {self.command}\nexit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n"
                f"--- stderr\n{self.stderr[-3000:]}")


@dataclass
class Run:
    pattern: str
    check: Callable  # check(sandbox, the README command, its Result: .command is what ran)
    start: Optional[Callable] = None  # start(sandbox, command) -> Result; default: run it with bash
    after: Optional[str] = None  # an earlier README command (a pattern) that must have run first
    timeout: int = TIMEOUT_S


def classify(command):
    """("skip", reason), ("run", Run) or ("unclassified", None)."""
    for pattern, reason in SKIP:
        if re.search(pattern, command):
            return "skip", reason
    for rule in RUNS:
        if re.search(rule.pattern, command):
            return "run", rule
    return "unclassified", None


# ---------------------------------------------------------------- output checks

def _env_and_args(command):
    """({VAR: value} of the leading assignments, the remaining words) of `command`."""
    words = shlex.split(command)
    assignments = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    return assignments, words


def _check_topk(topk, k=5):
    assert len(topk) == k, topk
    for entry in topk:
        assert 0 <= entry["index"] < 1000 and entry["label"] == LABELS[entry["index"]], entry
        assert 0 < entry["prob"] <= 1, entry
    probs = [entry["prob"] for entry in topk]
    assert probs == sorted(probs, reverse=True), probs


def _check_weights(sandbox, result, model):
    """The model's released file is in the Hub cache; if it was not before, the stand-in Hub sent it."""
    _, repo, filename = RELEASED[model]
    assert sandbox.cached(model), f"{repo}/{filename} is not in the Hub cache after\n{result.describe()}"
    if model not in result.cached_before:
        assert f"GET /{repo}/resolve/main/{filename} 200" in result.hub_requests, result.hub_requests


def _infer_args(args):
    """infer_rpi.py's options that the README's examples use (a new one: teach this parser)."""
    parser = argparse.ArgumentParser(prog="infer_rpi.py (as the README test reads it)")
    parser.add_argument("-m", "--model", default=DEFAULT_MODEL)
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--benchmark", type=int)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("images", nargs="*")
    assert args[:2] == [".venv/bin/python", "vim/infer_rpi.py"], args
    opts, unknown = parser.parse_known_args(args[2:])
    assert not unknown, f"teach _infer_args the README's infer_rpi.py options {unknown}"
    return opts


def check_infer(sandbox, command, result):
    """infer_rpi.py on images (or the bundled sample): a top-5 per image, text or JSON."""
    assert result.returncode == 0, result.describe()
    assignments, args = _env_and_args(result.command)
    opts = _infer_args(args)
    name, _, _ = RELEASED[opts.model]
    images = opts.images or [str(SAMPLE)]
    if not opts.images:
        assert "no image given" in result.stderr, result.describe()
    if "HF_HUB_OFFLINE" in assignments:
        assert result.hub_requests == [], f"offline, yet the Hub was asked: {result.hub_requests}"
    _check_weights(sandbox, result, opts.model)
    if opts.json:
        report = json.loads(result.stdout)
        assert (report["model"], report["threads"], report["quantize"]) == (name, opts.threads, opts.quantize)
        assert report["checkpoint"].startswith(str(sandbox.hf_home / "hub")), report["checkpoint"]
        assert [r["image"] for r in report["results"]] == images, report["results"]
        for item in report["results"]:
            _check_topk(item["topk"])
        return
    blocks = result.stdout.split("\n\n")
    for image, block in zip(images, blocks):
        lines = block.strip("\n").splitlines()
        assert lines[0].endswith(image) and lines[1].split() == ["rank", "prob", "class"], block
        rows = [re.fullmatch(r"\s+(\d)\s+(\d+\.\d\d)%\s+(.+)", line) for line in lines[2:7]]
        assert all(rows) and [int(r.group(1)) for r in rows] == [1, 2, 3, 4, 5], block
        assert all(r.group(3) in LABELS for r in rows), block
    assert len(blocks) == len(images) + 1, result.stdout
    assert re.search(rf"^model {name}, {opts.threads} threads, quantize {opts.quantize}, ", result.stdout, re.M), \
        result.stdout
    if opts.benchmark:
        match = re.search(rf"^benchmark: median ([\d.]+) ms, p90 ([\d.]+) ms over {opts.benchmark} runs$",
                          result.stdout, re.M)
        assert match and float(match.group(1)) <= float(match.group(2)), result.stdout


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_paths_from(sandbox, command, result):
    """`PRODUCER | infer_rpi.py --paths-from - --json`: one JSON line per path the producer lists."""
    assert result.returncode == 0, result.describe()
    producer = result.command.split(" | ")[0]
    listed = subprocess.run(["bash", "-c", producer], cwd=sandbox.clone, capture_output=True, text=True,
                            timeout=60, check=True).stdout.split()
    assert listed, f"{producer!r} lists nothing in the sandbox"
    items = _json_lines(result.stdout)
    assert [item["image"] for item in items] == listed, result.describe()
    for item in items:
        _check_topk(item["topk"])


def check_video_jq(sandbox, command, result):
    """`infer_rpi.py --video FILE --json | jq -c '[.frame, .topk[0].label]'`: [frame, label] lines."""
    assert result.returncode == 0, result.describe()
    pairs = _json_lines(result.stdout)
    assert pairs, result.describe()
    frames = [frame for frame, _ in pairs]
    assert frames == sorted(set(frames)) and 0 <= frames[0] and frames[-1] < CLIP_FRAMES, frames
    assert all(label in LABELS for _, label in pairs), pairs
    assert re.search(rf"classified {len(pairs)} of {CLIP_FRAMES} frames", result.stderr), result.describe()


def _main_line(stdout):
    match = re.search(r"^(\S+) on (\S+): (\d+) images: top-1 ([\d.]+)% \((\d+)\), top-5 ([\d.]+)% \((\d+)\), "
                      r"loss ([\d.]+)$", stdout, re.M)
    assert match, stdout
    return match


def _val_images(sandbox, data_path):
    root = sandbox.clone / data_path
    root = root / "val" if (root / "val").is_dir() else root
    return sum(1 for path in root.rglob("*") if path.is_file())


def check_main_eval(sandbox, command, result):
    """main.py --eval: one line with the model, the data and top-1 / top-5 / loss over every image."""
    assert result.returncode == 0, result.describe()
    args = shlex.split(result.command)
    model, data = args[args.index("--model") + 1], args[args.index("--data-path") + 1]
    match = _main_line(result.stdout)
    assert match.group(1) == RELEASED[model][0] and int(match.group(3)) == _val_images(sandbox, data), match.group(0)
    _check_weights(sandbox, result, model)
    return match


def check_main_eval_distributed(sandbox, command, result):
    """torchrun ... main.py --eval: the same totals as the README's single-process evaluation."""
    match = check_main_eval(sandbox, command, result)
    single = _main_line(sandbox.results[sandbox.prerequisite(command)].stdout)
    assert match.group(1, 2, 3, 5, 7) == single.group(1, 2, 3, 5, 7), (match.group(0), single.group(0))
    assert math.isclose(float(match.group(8)), float(single.group(8)), rel_tol=1e-4), (match.group(0), single.group(0))


def _option(command, name):
    args = shlex.split(command)
    return args[args.index(name) + 1]


def check_main_train(sandbox, command, result):
    """main.py --finetune / --resume: a line per epoch (train loss, val), out/checkpoint.pth, log.txt."""
    import torch

    assert result.returncode == 0, result.describe()
    args = shlex.split(result.command)
    out = sandbox.clone / _option(result.command, "--output-dir")
    epochs = int(_option(result.command, "--epochs"))
    first = 0  # epochs are numbered from 0, as upstream's; --resume continues after the last one saved
    if "--resume" in args:
        first = int(_option(sandbox.results[sandbox.prerequisite(command)].command, "--epochs"))
    ran = [int(m.group(1)) for m in re.finditer(r"^epoch (\d+): train loss [\d.]+, val \d+ images: top-1 ",
                                                result.stdout, re.M)]
    assert ran == list(range(first, epochs)), result.describe()
    with torch.serialization.safe_globals([argparse.Namespace]):  # the released layout's "args"
        state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["model"]["head.weight"].shape[0] == len(CLASSES)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [record["epoch"] for record in log] == list(range(epochs)), log
    if "--finetune" in args:
        _check_weights(sandbox, result, _option(result.command, "--model"))


def _classify_answer(body, topk):
    answer = json.loads(body)
    assert set(answer) == {"model", "topk", "timing_ms"}, answer
    assert answer["model"] == RELEASED[DEFAULT_MODEL][0], answer
    _check_topk(answer["topk"], topk)
    assert set(answer["timing_ms"]) == {"queue", "preprocess", "inference"}, answer


def start_server(sandbox, command):
    """Start the README's server command on a free port and wait (bounded) for /readyz."""
    sandbox.port = _free_port()
    log = open(sandbox.root / "server.log", "w")
    process = subprocess.Popen(["bash", "-c", f"{command} --port {sandbox.port}"], cwd=sandbox.clone,
                               env=sandbox.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sandbox.server = process
    deadline = time.monotonic() + READY_TIMEOUT_S
    status = None
    while time.monotonic() < deadline and process.poll() is None:
        status = _get(f"http://127.0.0.1:{sandbox.port}/readyz")[0]
        if status == 200:
            break
        time.sleep(0.2)
    return Result(f"{command} --port {sandbox.port}", 0 if status == 200 else -1, "", sandbox.server_log())


def check_server(sandbox, command, result):
    """The server answers /readyz 200 and /v1/info names the model (stopped later, by SIGTERM)."""
    assert result.returncode == 0 and sandbox.server.poll() is None, f"not ready in {READY_TIMEOUT_S} s\n" \
                                                                     f"{result.describe()}"
    status, body = _get(f"http://127.0.0.1:{sandbox.port}/v1/info")
    assert status == 200 and json.loads(body)["model"] == RELEASED[DEFAULT_MODEL][0], body
    _check_weights(sandbox, result, DEFAULT_MODEL)


def check_curl(sandbox, command, result):
    """A README curl line against the running server: 200 and the documented JSON."""
    assert result.returncode == 0, result.describe()
    query = re.search(r"topk=(\d+)", command)
    _classify_answer(result.stdout, int(query.group(1)) if query else 5)
    sandbox.classify_count += 1
    deadline = time.monotonic() + 30  # the access log line is written after the answer is sent
    while sandbox.server_log().count("POST /v1/classify 200") < sandbox.classify_count:
        assert time.monotonic() < deadline, sandbox.server_log()
        time.sleep(0.1)
    assert sandbox.server_log().count("POST /v1/classify") == sandbox.classify_count, sandbox.server_log()


def watch_incoming(sandbox, command):
    """The inotifywait pipeline: start it, wait until inotifywait watches, write into incoming/ a
    finished JPEG, a PNG renamed into place and files it must leave out, read a line per image,
    then Ctrl-C (SIGINT to the process group). No pipefail: the status is infer_rpi.py's, as in a
    user's shell (inotifywait itself dies of the SIGINT)."""
    process = subprocess.Popen(["bash", "-c", command], cwd=sandbox.clone, env=sandbox.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines, errors = queue.Queue(), []
    threading.Thread(target=_pump, args=(process.stdout, lines.put), daemon=True).start()
    threading.Thread(target=_pump, args=(process.stderr, errors.append), daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while not _inotify_watching(process.pid):
            assert time.monotonic() < deadline and process.poll() is None, "inotifywait did not start watching"
            time.sleep(0.05)
        incoming = sandbox.clone / "incoming"
        shutil.copy(sandbox.clone / "cat.jpg", incoming / "a.jpg")  # close_write
        shutil.copy(sandbox.clone / "dog.png", incoming / ".b.png.part")  # an app's temporary file
        os.rename(incoming / ".b.png.part", incoming / "B.PNG")  # moved_to; --includei: any case
        (incoming / "notes.txt").write_text("not an image\n")
        out = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(out) < 2 and time.monotonic() < deadline and process.poll() is None:
            try:
                out.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        time.sleep(1)  # a third line, if one were wrongly produced, would arrive now
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    time.sleep(0.2)  # the reader threads drain the pipes
    while not lines.empty():
        out.append(lines.get())
    return Result(command, process.returncode, "".join(out), "".join(errors))


def _pump(stream, sink):
    for line in stream:
        sink(line)


def check_incoming(sandbox, command, result):
    """A JSON line for each image that arrived, none for the others; Ctrl-C ends it with exit 0."""
    assert result.returncode == 0, result.describe()
    items = _json_lines(result.stdout)
    assert [item["image"] for item in items] == ["incoming/a.jpg", "incoming/B.PNG"], result.describe()
    for item in items:
        _check_topk(item["topk"])


def _inotify_watching(group):
    """True once an inotifywait process of process group `group` holds an inotify watch."""
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            comm, rest = text.split("(", 1)[1].rsplit(")", 1)
            if comm != "inotifywait" or int(rest.split()[2]) != group:
                continue
            for info in (stat.parent / "fdinfo").iterdir():
                if "inotify wd:" in info.read_text():
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False


_INFER = r"^((HF_ENDPOINT|HF_HUB_OFFLINE)=\S+ )*\.venv/bin/python vim/infer_rpi\.py"
RUNS = [
    Run(r"^inotifywait .* \| \.venv/bin/python vim/infer_rpi\.py --paths-from - --json$", check_incoming,
        start=watch_incoming),
    Run(r"^(find|ls) .* \| \.venv/bin/python vim/infer_rpi\.py --paths-from - --json$", check_paths_from),
    Run(r"^\.venv/bin/python vim/infer_rpi\.py --video \S+ --json \| jq -c '\[\.frame, \.topk\[0\]\.label\]'$",
        check_video_jq),
    Run(r"^HF_HUB_OFFLINE=1 \.venv/bin/python vim/infer_rpi\.py( |$)", check_infer, after=_INFER + r"$"),
    Run(_INFER + r"( |$)", check_infer),
    Run(r"^\.venv/bin/python vim/serve_rpi\.py$", check_server, start=start_server),
    Run(r"^curl .*localhost:8000/v1/classify", check_curl, after=r"^\.venv/bin/python vim/serve_rpi\.py$"),
    Run(r"^\.venv/bin/python vim/main\.py --eval ", check_main_eval),
    Run(r"^\.venv/bin/torchrun --nproc_per_node \d+ vim/main\.py --eval ", check_main_eval_distributed,
        after=r"^\.venv/bin/python vim/main\.py --eval .*--data-path DIR$"),
    Run(r"^\.venv/bin/python vim/main\.py --finetune ", check_main_train, timeout=TRAIN_TIMEOUT_S),
    Run(r"^\.venv/bin/python vim/main\.py --resume out/checkpoint\.pth ", check_main_train,
        after=r"^\.venv/bin/python vim/main\.py --finetune .*--output-dir out$", timeout=TRAIN_TIMEOUT_S),
]

# (pattern, replacement, why): see the module docstring's table
SUBSTITUTIONS = [
    (r"\bHF_ENDPOINT=\S+", lambda sb, m: f"HF_ENDPOINT={sb.endpoint}", "the loopback Hub stand-in"),
    (r"\blocalhost:8000\b", lambda sb, m: f"localhost:{sb.port}", "the server's free port"),
    (r"/path/to/imagenet\b", lambda sb, m: "DIR", "the sandbox's ImageFolder tree"),
]


# ---------------------------------------------------------------- the sandbox

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, OSError):
        return None, ""


class Sandbox:
    """A fresh clone's layout after set-up, the stand-in Hub, and the results of the commands run."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.clone = root / "clone"
        self.hf_home = root / "home" / ".cache" / "huggingface"
        self.results = {}
        self.server = None
        self.port = None
        self.classify_count = 0
        self.hub = None
        self.hub_lines_before = 0

    def build(self):
        self.clone.mkdir()
        (self.root / "home").mkdir()
        for name in ("vim", "scripts"):
            (self.clone / name).symlink_to(ROOT / name)
        (self.clone / ".venv").symlink_to(pathlib.Path(sys.prefix))
        _write_files(self.clone)
        self._start_hub()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("HF_", "HUGGINGFACE_", "VIM_", "CAUSAL_CONV1D_", "SELECTIVE_SCAN_"))}
        self.env.update(HOME=str(self.root / "home"), HF_HOME=str(self.hf_home), HF_ENDPOINT=self.endpoint)

    def _start_hub(self):
        import torch

        import vim_rpi

        for model, (_, repo, filename) in RELEASED.items():
            torch.manual_seed(0)
            (self.root / "hub" / repo).mkdir(parents=True)
            torch.save({"model": vim_rpi.create_model(model).state_dict()}, self.root / "hub" / repo / filename)
        port_file = self.root / "hub.port"
        self.hub = subprocess.Popen([sys.executable, str(FAKE_HUB), str(self.root / "hub"), str(port_file)],
                                    stdout=open(self.root / "hub.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert time.monotonic() < deadline and self.hub.poll() is None, "the stand-in Hub did not start"
            time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{port_file.read_text().strip()}"

    def close(self):
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait(timeout=30)
        if self.hub is not None:
            self.hub.kill()
            self.hub.wait(timeout=30)

    def hub_log(self):
        return (self.root / "hub.log").read_text().splitlines()

    def server_log(self):
        return (self.root / "server.log").read_text()

    def cached(self, model):
        _, repo, filename = RELEASED[model]
        return any((self.hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").glob(f"*/{filename}"))

    def substitute(self, command):
        for pattern, replace, _ in SUBSTITUTIONS:
            command = re.sub(pattern, lambda m: replace(self, m), command)
        return command

    def prerequisite(self, command):
        """The first README command before `command` that its rule's `after` names."""
        rule = classify(command)[1]
        earlier = COMMANDS[:COMMANDS.index(command)]
        found = [c for c in earlier if re.search(rule.after, c)]
        assert found, f"{command!r} needs an earlier README command matching {rule.after!r}; the README has none"
        return found[0]

    def run_once(self, command):
        """Run README `command` (its prerequisite first), once; the Result."""
        if command not in self.results:
            rule = classify(command)[1]
            if rule.after:
                self.run_once(self.prerequisite(command))
            before = {m for m in RELEASED if self.cached(m)}
            self.hub_lines_before = len(self.hub_log())
            if rule.start is not None:
                result = rule.start(self, command)
            else:
                result = self._bash(self.substitute(command), rule.timeout)
            result.cached_before = before
            result.hub_requests = self.hub_log()[self.hub_lines_before:]
            self.results[command] = result
        return self.results[command]

    def _bash(self, command, timeout):
        process = subprocess.Popen(["bash", "-o", "pipefail", "-c", command], cwd=self.clone, env=self.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"timed out after {timeout} s: {command}\n{err[-3000:]}")
        return Result(command, process.returncode, out, err)


def _write_files(clone):
    """The images, video and folders the README's commands name (see the module docstring)."""
    import cv2
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def picture(width, height):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
        return (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)

    Image.fromarray(picture(320, 240)).save(clone / "cat.jpg")
    Image.fromarray(picture(300, 400)).save(clone / "dog.png")
    Image.fromarray(picture(640, 480)).save(clone / "photo.jpg")
    (clone / "photos" / "2024").mkdir(parents=True)
    Image.fromarray(picture(200, 150)).save(clone / "photos" / "beach.jpg")
    Image.fromarray(picture(150, 200)).save(clone / "photos" / "2024" / "park.jpg")
    Image.fromarray(picture(100, 100)).save(clone / "photos" / "scan.png")
    (clone / "incoming").mkdir()
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name in CLASSES:
            (clone / "DIR" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(picture(96, 80)).save(clone / "DIR" / split / name / f"{i}.jpg")
    writer = cv2.VideoWriter(str(clone / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for _ in range(CLIP_FRAMES):
        writer.write(picture(96, 64))
    writer.release()
    assert (clone / "clip.mp4").stat().st_size > 0, "OpenCV wrote no clip.mp4"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    missing = [tool for tool in ("bash", "curl", "jq", "inotifywait") if shutil.which(tool) is None]
    assert not missing, f"missing {', '.join(missing)}: apt-get install curl jq inotify-tools (.ci/run does)"
    assert sys.prefix != sys.base_prefix, "run the tests with the venv's python (.venv/bin/python -m pytest)"
    box = Sandbox(tmp_path_factory.mktemp("readme-commands"))
    try:
        box.build()
        yield box
    finally:
        box.close()


# ---------------------------------------------------------------- the tests

def test_every_command_is_classified():
    """Each README command is RUN or SKIP by an explicit rule; the served example is there."""
    assert len(COMMANDS) >= 20, COMMANDS
    unclassified = [c for c in COMMANDS if classify(c)[0] == "unclassified"]
    assert not unclassified, f"add a RUN or SKIP rule to {__name__} for: {unclassified}"
    kinds = {c: classify(c)[0] for c in COMMANDS}
    assert any(kinds[c] == "run" and "serve_rpi.py" in c for c in COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c if len(c) <= 100 else c[:97] + "..." for c in COMMANDS])
def test_readme_command(command, request):
    kind, rule = classify(command)
    if kind == "skip":
        pytest.skip(rule)
    assert kind == "run", f"no RUN or SKIP rule for README command {command!r}"
    box = request.getfixturevalue("sandbox")
    rule.check(box, command, box.run_once(command))


@pytest.mark.slow
def test_served_example_stops_on_sigterm(sandbox):
    """The README's server, after answering its curl lines: SIGTERM, exit 0 within --grace-s."""
    server_command = next(c for c in COMMANDS if re.search(r"^\.venv/bin/python vim/serve_rpi\.py$", c))
    sandbox.run_once(server_command)
    process = sandbox.server
    assert process.poll() is None, sandbox.server_log()
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 0, sandbox.server_log()
