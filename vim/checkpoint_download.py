"""Turn a checkpoint argument (local path or http(s) URL) into a local file.

URLs are downloaded once into a cache directory (`$VIM_RPI_CACHE`, else `~/.cache/vim-rpi`) and
reused from there without touching the network; like torch.hub, the cache is keyed by the URL's
file name. A download is written to a temporary file in the cache directory and renamed into
place only when every byte announced by Content-Length has arrived and the bytes start like a
PyTorch checkpoint (a zip archive or a pickle), so neither an interrupted download nor an error
page served with status 200 ever leaves a file that looks complete.

Standard library only (urllib): no `requests` on the Pi.
"""

import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from vim_rpi.errors import DownloadError
from vim_rpi.progress import progress_bar

__all__ = ["DownloadError", "default_cache_dir", "publish_temp_file", "resolve_checkpoint"]

CACHE_ENV = "VIM_RPI_CACHE"
_TIMEOUT_S = 30.0  # per connect / per read, not for the whole file: a slow Pi link is fine
_CHUNK_BYTES = 1 << 20


def default_cache_dir() -> Path:
    """`$VIM_RPI_CACHE` when set and non-empty, else `~/.cache/vim-rpi`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vim-rpi"


def resolve_checkpoint(spec, *, cache_dir=None, progress=True) -> Path:
    """Return a local checkpoint file for `spec`.

    Args:
        spec: a local path or an http(s) URL.
        cache_dir: where URLs are cached; default `default_cache_dir()`.
        progress: draw a progress bar on stderr while downloading.
    Raises:
        DownloadError: the path does not exist or is not a file, or the download failed.
    """
    spec = os.fspath(spec)
    if urllib.parse.urlsplit(spec).scheme.lower() in ("http", "https"):
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _cached_download(spec, cache, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DownloadError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise DownloadError(f"checkpoint is not a file: {path}")
    return path


def _cached_download(url: str, cache: Path, progress: bool) -> Path:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if name in ("", ".", ".."):
        raise DownloadError(f"cannot derive a file name from the checkpoint URL {url}")
    dest = cache / name
    if not dest.is_file():
        _download(url, dest, progress)
    return dest


def _download(url: str, dest: Path, progress: bool):
    """Fetch `url` into `dest` through a temporary file renamed only once complete."""
    request = urllib.request.Request(url, headers={"User-Agent": "vim-rpi"})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except OSError as e:  # URLError (DNS, refused, unreachable), timeout, reset before a reply
        raise DownloadError(_offline_message(url, getattr(e, "reason", e))) from e
    with response:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        except OSError as e:
            raise DownloadError(
                f"cannot write to the checkpoint cache {dest.parent} ({e.strerror or e}); "
                f"set {CACHE_ENV} to a writable directory"
            ) from e
        try:
            with os.fdopen(fd, "wb") as out:
                _copy(response, out, url, dest.name if progress else None)
            _check_looks_like_checkpoint(tmp, url)
            publish_temp_file(tmp, dest)
        except OSError as e:  # read errors are DownloadErrors already, so this is the disk
            Path(tmp).unlink(missing_ok=True)
            raise DownloadError(f"cannot write the checkpoint to {dest.parent}: {e.strerror or e}") from e
        except BaseException:
            # Also on Ctrl-C: a half file must not survive.
            Path(tmp).unlink(missing_ok=True)
            raise


def publish_temp_file(tmp, dest):
    """Rename the finished temporary file `tmp` to `dest`, first giving it the permissions a
    newly created file gets (mkstemp makes 0600: a checkpoint should read like any file)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dest)


def _copy(response, out, url: str, progress_name):
    """Stream the body into `out`, checking it against Content-Length when the server sent one."""
    total = _content_length(response)
    bar = progress_bar(total, f"downloading {progress_name}", enabled=progress_name is not None, unit="B",
                       unit_scale=True)
    received = 0
    with bar:
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, bad chunking
                raise DownloadError(
                    f"download of {url} was interrupted after {received} bytes ({e}); "
                    "run again to retry"
                ) from e
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    # http.client returns b"" instead of raising when the peer closes early, so count bytes.
    if total is not None and received != total:
        raise DownloadError(
            f"download of {url} was cut off after {received} of {total} bytes; run again to retry"
        )


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
        "copy the checkpoint here by other means and pass --checkpoint PATH"
    )
