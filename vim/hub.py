"""Weight fetching: turn a checkpoint argument into a local file.

A checkpoint argument (`spec`) is one of:
  - "hf-hub:OWNER/REPO/FILE" (timm's prefix): a file of a Hugging Face Hub repository, fetched
    with huggingface_hub's `hf_hub_download`, so HF_ENDPOINT (a mirror), HF_HUB_OFFLINE, HF_HOME /
    HF_HUB_CACHE (the cache shared with every other Hub user) and HF_TOKEN work as they do
    everywhere else; a connection cut mid-file is resumed within the run with a Range request
    (huggingface_hub 2.x keeps no partial file for a later run). A file already in the Hub cache
    is used without asking the endpoint again, as torch.hub does: released weights never change,
    and a Pi on a poor link should not wait for a metadata request on every run. The released
    Vim weights are such references (`factory.default_checkpoint`).
  - an http(s) URL: downloaded once into `$VIM_RPI_CACHE` (else `~/.cache/vim-rpi`) and reused
    from there without touching the network; like torch.hub, this cache is keyed by file name.
  - a local path, returned as it is.

Migration: earlier versions downloaded the released weights into `$VIM_RPI_CACHE`. A released
file found there by name is used in place, before the Hub is asked: nobody downloads 115 MB
again after upgrading, and nothing is copied or moved (the old cache may sit on another file
system than the Hub cache, and paths to it may be written in people's scripts).

URL downloads are written to a temporary file in the cache directory and renamed into place only
when every byte announced by Content-Length has arrived and the bytes start like a PyTorch
checkpoint, so neither an interrupted download nor an error page served with status 200 leaves a
file that looks complete. A connection cut mid-file is resumed with an HTTP Range request a few
times within the run (If-Range keeps a file that changed meanwhile from being spliced).

huggingface_hub is imported only when a Hub file is fetched: local paths and URLs, the common
case on a Pi after the first run, do not pay for its import.
"""

import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from vim_rpi import paths, registry
from vim_rpi.errors import DownloadError, option
from vim_rpi.progress import progress_bar
from vim_rpi.temp_files import make_temp_file

__all__ = ["HUB_PREFIX", "DownloadError", "default_cache_dir", "hub_reference", "is_remote", "fetch_checkpoint"]

HUB_PREFIX = "hf-hub:"
CACHE_ENV = "VIM_RPI_CACHE"
MIRROR_EXAMPLE = "https://hf-mirror.com"  # a public mirror many users in China rely on
_TIMEOUT_S = 30.0  # per connect / per read, not for the whole file: a slow Pi link is fine
_CHUNK_BYTES = 1 << 20
_ATTEMPTS = 5  # connections per URL download: the first, then resumptions after a cut
_RETRY_WAIT_S = 1.0  # pause before resuming: most cuts are transient
# (repository, file) of each released checkpoint, from the registry's pretrained cfgs
RELEASED_FILES = {(cfg["hf_hub_id"], cfg["hf_hub_filename"])
                  for cfg in map(registry.pretrained_cfg, registry.list_models()) if cfg["hf_hub_filename"]}


def default_cache_dir() -> Path:
    """`$VIM_RPI_CACHE` when set and non-empty, else `~/.cache/vim-rpi`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vim-rpi"


def hub_reference(repo_id, filename) -> str:
    """The checkpoint spec of file `filename` in Hub repository `repo_id`."""
    return f"{HUB_PREFIX}{repo_id}/{filename}"


def is_remote(spec) -> bool:
    """Whether `spec` names a Hub file or a URL (its local file is a cached download)."""
    spec = os.fspath(spec)
    return spec.startswith(HUB_PREFIX) or _is_url(spec)


def fetch_checkpoint(spec, *, progress=True, refetch=False, cache_dir=None) -> Path:
    """Return a local checkpoint file for `spec`.

    Args:
        spec: a local path, an http(s) URL, or a Hub reference "hf-hub:OWNER/REPO/FILE".
        progress: draw a progress bar on stderr while downloading.
        refetch: download again even when a cached copy exists (which is then replaced):
            for a cached download that turned out to be damaged.
        cache_dir: where URLs are cached; default `default_cache_dir()`.
    Raises:
        DownloadError: the path does not exist or is not a regular file (or cannot be looked
        at: too long, no permission), or the download failed; the message says what to do.
    """
    spec = os.fspath(spec)
    if spec.startswith(HUB_PREFIX):
        repo_id, filename = _parse_hub_reference(spec)
        return _fetch_from_hub(repo_id, filename, progress, refetch)
    if _is_url(spec):
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _cached_download(spec, cache, progress, refetch)
    path = Path(spec).expanduser()
    problem = paths.named_file_problem(path, "checkpoint")
    if problem is not None:
        raise DownloadError(problem)
    return path


def _is_url(spec: str) -> bool:
    return urllib.parse.urlsplit(spec).scheme.lower() in ("http", "https")


def _parse_hub_reference(spec: str):
    parts = spec[len(HUB_PREFIX):].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise DownloadError(f"{spec!r} is not a Hub file reference; write {HUB_PREFIX}OWNER/REPO/FILE")
    return f"{parts[0]}/{parts[1]}", parts[2]


# ---------------------------------------------------------------- the Hugging Face Hub

def _fetch_from_hub(repo_id: str, filename: str, progress: bool, refetch: bool) -> Path:
    # Only the released files were ever cached under their bare names by earlier versions: a file
    # of another repository with the same name must not be taken for them.
    legacy = default_cache_dir() / os.path.basename(filename)
    if (repo_id, filename) in RELEASED_FILES and os.path.isfile(legacy):  # False, not an error, when it cannot be told
        if not refetch:
            return legacy
        legacy.unlink()  # damaged: a fresh copy goes to the Hub cache like every new download

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    _leave_hub_logging_to_the_application()

    what = f"{filename} of {repo_id}"
    endpoint = constants.ENDPOINT
    advice = (f"set HF_ENDPOINT to a mirror (e.g. HF_ENDPOINT={MIRROR_EXAMPLE}) or pass a local copy of the file as "
              f"{option('checkpoint')}")
    bar = _hub_bar(os.path.basename(filename), progress)
    try:
        # Released files do not change: once cached, no request (and no wait on a bad link).
        cached = None if refetch else huggingface_hub.try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return Path(cached)
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, force_download=refetch, library_name="vim-rpi",
                                                    tqdm_class=bar))
    except LocalEntryNotFoundError as err:
        if constants.HF_HUB_OFFLINE:
            raise DownloadError(f"{what} is not in the Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set, "
                                f"so it was not downloaded; unset HF_HUB_OFFLINE to fetch it from {endpoint}, or "
                                f"{advice}") from None
        if isinstance(err.__cause__, HfHubHTTPError):  # the endpoint answered, with an error
            raise _http_error(err.__cause__, what, repo_id, endpoint, advice) from None
        raise DownloadError(f"cannot fetch {what} from {endpoint} ({_root_cause(err)}): this machine seems to be "
                            f"offline or the endpoint is unreachable; {advice}") from None
    except HfHubHTTPError as err:
        raise _http_error(err, what, repo_id, endpoint, advice) from None
    except ValueError as err:  # a malformed repository or file name; when refetching, a download that could not start
        if not refetch:
            raise DownloadError(f"cannot fetch {what}: {_root_cause(err)}") from None
        if constants.HF_HUB_OFFLINE:
            raise DownloadError(f"cannot fetch {what} again: HF_HUB_OFFLINE is set; unset it, or {advice}") from None
        raise DownloadError(f"cannot fetch {what} again from {endpoint} ({_root_cause(err)}); {advice}") from None
    except Exception as err:  # the HTTP client's own errors (httpx or httpx2, by version), disk errors
        raise DownloadError(f"download of {what} from {endpoint} failed ({_root_cause(err)}); run again to "
                            f"retry, or {advice}") from None


def _leave_hub_logging_to_the_application():
    """huggingface_hub gives its logger a stderr handler of its own when it is imported, so in a
    program that configures logging (our front ends do) each of its records, such as the warnings
    of every retry, is printed twice. Without that handler its records go to the program's
    handlers, or to Python's last-resort handler (warnings and above) in a program that configures
    none: once either way."""
    from huggingface_hub.utils import logging as hub_logging  # adds that handler when first imported

    logger = hub_logging.get_logger()  # the library's root logger, "huggingface_hub"
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:  # the one it adds; a FileHandler or the like is someone's choice
            logger.removeHandler(handler)


def _http_error(err, what: str, repo_id: str, endpoint: str, advice: str) -> DownloadError:
    status = err.response.status_code if err.response is not None else "error"
    if status in (401, 403):
        return DownloadError(f"{endpoint} refused {what} (HTTP {status}); if the repository needs a login, set "
                             f"HF_TOKEN to an access token, or {advice}")
    return DownloadError(f"{endpoint} could not serve {what} (HTTP {status}); if HF_ENDPOINT names a mirror, check "
                         f"that it mirrors {repo_id}, or pass a local copy as {option('checkpoint')}")


def _root_cause(err: BaseException) -> str:
    """The innermost exception of a chain, as `Type: message` on one line."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _hub_bar(filename: str, enabled: bool):
    """A `tqdm_class` for hf_hub_download: our bar (stderr, no carriage returns off a terminal,
    hidden when not `enabled`, named after the file rather than the URL) built from the counts
    huggingface_hub passes; its display arguments (desc, position, bar_format...) are dropped."""

    def make(*, total=None, initial=0, unit="B", unit_scale=True, **_display):
        return progress_bar(total, f"downloading {filename}", enabled=enabled, unit=unit, unit_scale=unit_scale,
                            initial=initial)

    return make


# ---------------------------------------------------------------- plain URLs

def _cached_download(url: str, cache: Path, progress: bool, refetch: bool) -> Path:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if name in ("", ".", ".."):
        raise DownloadError(f"cannot derive a file name from the checkpoint URL {url}")
    dest = cache / name
    if refetch:
        dest.unlink(missing_ok=True)
    if not os.path.isfile(dest):  # a cache that cannot be looked into: download, and say so if it cannot be written
        _download(url, dest, progress)
    return dest


def _download(url: str, dest: Path, progress: bool):
    """Fetch `url` into `dest` through a temporary file renamed only once complete."""
    response = _open(url, 0, None)
    with response:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = make_temp_file(dest.parent, prefix=f".{dest.name}.", suffix=".part")
        except OSError as e:
            raise DownloadError(
                f"cannot write to the checkpoint cache {dest.parent} ({e.strerror or e}); "
                f"set {CACHE_ENV} to a writable directory"
            ) from e
        try:
            with os.fdopen(fd, "wb") as out:
                _receive(response, out, url, dest.name if progress else None)
            _check_looks_like_checkpoint(tmp, url)
            os.replace(tmp, dest)
        except OSError as e:  # read errors are DownloadErrors already, so this is the disk
            Path(tmp).unlink(missing_ok=True)
            raise DownloadError(f"cannot write the checkpoint to {dest.parent}: {e.strerror or e}") from e
        except BaseException:
            # Also on Ctrl-C: a half file must not survive.
            Path(tmp).unlink(missing_ok=True)
            raise


def _open(url: str, start: int, validator):
    """The response for `url` from byte `start` on (a Range request when start > 0, If-Range
    `validator` so that a file changed since is sent whole instead of spliced)."""
    headers = {"User-Agent": "vim-rpi"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if validator:
            headers["If-Range"] = validator
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except OSError as e:  # URLError (DNS, refused, unreachable), timeout, reset before a reply
        if start:
            raise _Cut(e) from e
        raise DownloadError(_offline_message(url, getattr(e, "reason", e))) from e


class _Cut(Exception):
    """The connection failed mid-file (resumable)."""


def _receive(response, out, url: str, progress_name):
    """Stream the body into `out`, resuming with Range requests after a cut, and check the total
    against Content-Length when the server sent one."""
    total = _content_length(response)
    validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
    received, cause = 0, None
    with progress_bar(total, f"downloading {progress_name}", enabled=progress_name is not None, unit="B",
                      unit_scale=True) as bar:
        for attempt in range(_ATTEMPTS):
            if attempt:
                time.sleep(_RETRY_WAIT_S)
                try:
                    response = _open(url, received, validator)
                except _Cut as e:
                    cause = e.__cause__
                    continue
                start = _resumed_from(response)
                if start not in (0, received):
                    response.close()
                    cause = "the server resumed at another byte than asked"
                    continue
                if start == 0:  # the server sent the whole file (it changed, or ignores Range): start over
                    out.seek(0)
                    out.truncate()
                    bar.reset(total=total)
                    received = 0
            cut = None
            with response:
                while True:
                    try:
                        chunk = response.read(_CHUNK_BYTES)
                    except (OSError, http.client.HTTPException) as e:  # reset, timeout, bad chunking
                        cut = e
                        break
                    if not chunk:
                        break
                    out.write(chunk)  # a disk error here is not a cut: it ends the download
                    received += len(chunk)
                    bar.update(len(chunk))
            if cut is not None:
                cause = cut
                continue
            # http.client returns b"" instead of raising when the peer closes early, so count bytes.
            if total is None or received == total:
                return
            cause = f"cut off after {received} of {total} bytes"
    raise DownloadError(f"download of {url} was interrupted after {received} bytes ({cause}), "
                        f"{_ATTEMPTS} attempts; run again to retry")


def _resumed_from(response):
    """Where the body of `response` starts in the file: 0 for a whole file, the Content-Range
    start of a partial one (206), None when a 206 does not say."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


# torch.save writes a zip archive; files from torch < 1.6 start with a pickle protocol opcode.
_CHECKPOINT_MAGICS = (b"PK\x03\x04", b"\x80")


def _check_looks_like_checkpoint(path, url: str):
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(_CHECKPOINT_MAGICS):
        shown = head[:40].decode("latin-1").translate({c: "." for c in range(32)})
        raise DownloadError(f"{url} did not send a PyTorch checkpoint (it starts with {shown!r}, e.g. an "
                            "HTML error or login page); check the URL")


def _content_length(response):
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _offline_message(url: str, reason) -> str:
    return (
        f"download of {url} failed ({reason}): this machine seems to be offline; "
        f"copy the checkpoint here by other means and pass it as {option('checkpoint')}"
    )
