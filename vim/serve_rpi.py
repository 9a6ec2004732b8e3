"""Serve Vision Mamba over HTTP: the model stays loaded, so classifying costs a forward, not a start-up.

    python vim/serve_rpi.py -c CKPT                        # http://127.0.0.1:8000/ (page) and /v1/classify
    python vim/serve_rpi.py --host 0.0.0.0 --token SECRET  # the LAN, with a token
    curl --data-binary @photo.jpg localhost:8000/v1/classify

A thin shell: open the port first (a busy port is one line and exit 5, before torch is even
imported), parse the options (infer_rpi.py's model options plus the server's), build the app
(`vim_rpi.server.create_app`) and run it on uvicorn with the connection limits of
`vim_rpi.connections`. The model loads in the background after the port is open; /readyz turns
200 once it is warm. SIGTERM or SIGINT: stop accepting, finish the queued requests (at most
--grace-s; the rest are answered 503), exit 0. Needs the optional packages in
scripts/requirements-serve.txt (FastAPI, uvicorn, python-multipart).
"""

import argparse
import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import sys

_log = logging.getLogger("vim_rpi.serve")

TOKEN_ENV = "VIM_SERVE_TOKEN"
EXIT_LISTEN = 5  # the address cannot be listened on (port in use, no permission, not this machine's)
BACKLOG = 64  # pending connections the kernel keeps; asyncio also accepts up to this many per wake-up
SPARE_FILES = 64  # descriptors besides the connections: the model's files, logs, pipes, the listening socket


def _epilog(cli):
    return f"""\
endpoints:
  POST /v1/classify?topk=5   the image as the raw body (curl --data-binary @photo.jpg) or as the
                             multipart field "image" -> {{"model", "topk": [{{"index", "label", "prob"}}],
                             "timing_ms": {{"queue", "preprocess", "inference"}}}}
  GET  /v1/info              model, checkpoint, threads, quantize, torch version, backends, limits
  GET  /healthz, /readyz     200 while running; 200 once the model is warm (503 before); HEAD too
  GET  /                     a web page: pick or take a photo, see its top-5
  GET  /docs, /openapi.json  the API's description
  Errors are JSON {{"error": "..."}}: 4xx for a client's mistake, 503 (with Retry-After) when the
  queue or the upload slots are full, the model is loading, or the server is stopping.

limits (README.md, "Limits and guarantees"): upload bodies in memory <= --uploads x --max-upload-mb;
  decoded images <= --decoders x the per-image budget; connections <= --max-connections, each
  closed when its request head takes longer than --header-timeout-s or it idles past --keep-alive-s.

environment:
  {TOKEN_ENV}            the token, if --token is not given

exit status:
  {cli.EXIT_OK} stopped by SIGTERM or Ctrl-C (after the queued requests), {cli.EXIT_USAGE} usage error (a LAN address
  without a token included), {cli.EXIT_CHECKPOINT} checkpoint could not be fetched or loaded,
  {EXIT_LISTEN} cannot listen on --host/--port (the port is in use, no permission, not this machine's address);
     checked before anything loads.
"""


# The server's bounds: (flag, type, least value, default, metavar, what it bounds).
_LEAST = {">= 1": lambda value: value >= 1, "> 0": lambda value: value > 0, ">= 0": lambda value: value >= 0}
LIMITS = (
    ("--queue", int, ">= 1", 16, "N", "most requests waiting for the model at once; more are answered 503"),
    ("--max-batch", int, ">= 1", 8, "N", "most waiting requests run together in one forward; 1: no batching"),
    ("--decoders", int, ">= 1", 2, "N", "threads decoding images beside the model; a large image holds up only one"),
    ("--uploads", int, ">= 1", 8, "N", "most uploads in memory at once (from their first byte until decoded); more are "
                                       "answered 503"),
    ("--max-upload-mb", float, "> 0", 20.0, "MB", "larger uploads are refused with 413"),
    ("--upload-idle-s", float, "> 0", 10.0, "S", "an upload that sends nothing for this long is refused with 408"),
    ("--upload-timeout-s", float, "> 0", 60.0, "S", "an upload that takes longer in all is refused with 408"),
    ("--header-timeout-s", float, "> 0", 10.0, "S", "a request's line and headers must arrive within this time of the "
                                                    "connection opening (or of the previous answer), or it is closed"),
    ("--keep-alive-s", float, "> 0", 5.0, "S", "an idle connection is closed after this long without a byte"),
    ("--max-connections", int, ">= 1", 64, "N", "most connections open at once; one more closes the one idle "
                                                "the longest"),
    ("--grace-s", float, ">= 0", 10.0, "S", "on SIGTERM/SIGINT, time left for queued requests; the rest get 503"),
)


def add_server_arguments(parser):
    """The server's own options (no model options: those need the package, and so torch)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 serves the LAN (then a token is required) [%(default)s]")
    parser.add_argument("--port", type=int, default=8000, help="TCP port [%(default)s]")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                        help=f"require 'Authorization: Bearer TOKEN' on /v1/* [${TOKEN_ENV}; none]")
    parser.add_argument("--insecure-no-token", action="store_true",
                        help="serve an address other than loopback without a token (anyone who reaches it may use it)")
    parser.add_argument("--allowed-hosts", default="", metavar="NAMES",
                        help="more Host names to answer to, comma-separated (e.g. a DNS name of this machine or a "
                             "reverse proxy's); * for any [IP addresses, localhost, the --host name, and this "
                             "machine's host name when serving the network]")
    parser.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                        help="other sites whose pages may use the API, comma-separated (e.g. "
                             "http://dashboard.lan:3000); * for any [none: cross-origin requests get 403]")
    for flag, kind, _, default, metavar, text in LIMITS:
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=f"{text} [%(default)s]")


def build_parser() -> argparse.ArgumentParser:
    from vim_rpi import cli

    parser = argparse.ArgumentParser(
        prog="serve_rpi.py",
        description="Serve Vision Mamba (Vim) image classification over HTTP: an API and a web page.",
        epilog=_epilog(cli),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_server_arguments(parser)
    cli.add_model_arguments(parser)
    cli.add_runtime_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no request log)")
    return parser


def _port_in_range(port):
    return 0 <= port <= 65535


def _needs_token(args, is_loopback):
    """Serving a non-loopback address without a token, not told --insecure-no-token."""
    return not (is_loopback(args.host) or args.token or args.insecure_no_token)


def check_args(parser, args) -> None:
    """Usage errors (exit 2) before anything slow."""
    from vim_rpi import access, cli

    if not _port_in_range(args.port):
        parser.error(f"--port must be in 0..65535, got {args.port}")
    for flag, _, least, *_ in LIMITS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if not _LEAST[least](value):  # NaN included
            parser.error(f"{flag} must be {least}, got {value}")
    if _needs_token(args, access.is_loopback):
        parser.error(f"serving {args.host} needs a token (--token or {TOKEN_ENV}): anyone on the network could "
                     f"use the API; to serve it open anyway, add --insecure-no-token")
    args.config = cli.classifier_config(parser, args)


class _Lenient(argparse.ArgumentParser):
    """A parser that raises instead of exiting: the full parser reports usage errors later."""

    def error(self, message):
        raise ValueError(message)


def listen(host, port):
    """The listening socket on host:port -> socket, or OSError (one line: what to do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (accepted ones
    # inherit it); without it each answer waits ~40 ms for Nagle and the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        hint = {errno.EADDRINUSE: "another program listens there; stop it or choose another --port",
                errno.EACCES: "ports below 1024 need root; choose --port 1024 or above",
                errno.EADDRNOTAVAIL: "not an address of this machine; see --host"}.get(error.errno, "see --host")
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror or error}; {hint}") from None
    return sock


def _listen_early(argv):
    """Bind the port before the package (and torch) is imported -> socket, or None when the
    full parser is to speak first (--help, a malformed option, a LAN address without a token)."""
    if {"-h", "--help"} & set(argv):
        return None
    parser = _Lenient(add_help=False)
    add_server_arguments(parser)
    try:
        args, _ = parser.parse_known_args(argv)
        from vim_rpi.access import is_loopback
    except (ValueError, ModuleNotFoundError):
        return None
    if not _port_in_range(args.port) or _needs_token(args, is_loopback):
        return None
    return listen(args.host, args.port)


def _raise_open_file_limit(max_connections):
    """Raise the soft limit on open files to what --max-connections needs (up to the hard
    limit); warn if the hard limit is lower. A flood can hold two accept bursts of BACKLOG
    sockets beyond the bound: the connections a burst evicts close on the next turn of the loop."""
    needed = max_connections + 2 * BACKLOG + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            _log.warning("warning: --max-connections %d needs %d open files, the limit is %d (ulimit -n, "
                         "LimitNOFILE=): connections past it wait in the kernel's queue", max_connections, needed,
                         target)


def _cannot_listen(error):
    """The one line for an address that cannot be listened on (`listen`'s OSError), and its exit status."""
    print(f"error: {error.strerror}", file=sys.stderr)
    return EXIT_LISTEN


def _exit_quietly(signum, frame):
    """SIGTERM/SIGINT outside uvicorn's own handling (before it starts, or when it re-raises the
    signal after its graceful shutdown): a clean exit 0."""
    raise SystemExit(0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    try:
        sock = _listen_early(argv)
    except OSError as error:
        return _cannot_listen(error)
    try:
        import uvicorn

        from vim_rpi import cli, connections
        from vim_rpi.server import Settings, create_app
    except ModuleNotFoundError as missing:
        sys.exit(f"error: {missing}; the server needs its optional packages: "
                 f"pip install -r scripts/requirements-serve.txt (and the project: pip install -e causal-conv1d "
                 f"-e mamba-1p1p1 -e .)")
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    cli.setup(args.quiet)
    if sock is None:
        try:
            sock = listen(args.host, args.port)
        except OSError as error:
            return _cannot_listen(error)
    _raise_open_file_limit(args.max_connections)
    if args.insecure_no_token and not args.token:
        _log.warning("warning: serving %s without a token (--insecure-no-token): anyone who reaches it can use "
                     "the API", args.host)
    if args.trust_checkpoint:
        _log.warning("--trust-checkpoint: unpickling the checkpoint may run code from it")

    failure = []

    def on_load_error(error):
        failure.append(error)
        server.should_exit = True

    settings = Settings(
        classifier=args.config, token=args.token, host=args.host, allowed_hosts=_split(args.allowed_hosts),
        allowed_origins=_split(args.allowed_origins), queue=args.queue, max_batch=args.max_batch,
        decoders=args.decoders, uploads=args.uploads, max_upload_mb=args.max_upload_mb,
        upload_idle_s=args.upload_idle_s, upload_timeout_s=args.upload_timeout_s, grace_s=args.grace_s,
        on_load_error=on_load_error)
    app = create_app(settings)
    protocol = connections.guarded_protocol(head_timeout_s=args.header_timeout_s,
                                            max_connections=args.max_connections)
    # uvicorn's own grace only backs ours up: the app answers what is left 503 when --grace-s ends.
    config = uvicorn.Config(app, http=protocol, ws="none", log_config=None, access_log=False,
                            timeout_keep_alive=args.keep_alive_s, timeout_graceful_shutdown=args.grace_s + 5,
                            backlog=BACKLOG, server_header=False)

    class Server(uvicorn.Server):
        async def serve(self, sockets=None):
            connections.AcceptErrorLog().install(asyncio.get_running_loop())
            await super().serve(sockets)

        async def shutdown(self, sockets=None):
            drain = asyncio.ensure_future(app.state.drain())  # now, not after the connections have closed
            await super().shutdown(sockets)
            await drain

    server = Server(config)
    _log.info("serving on http://%s:%d/ (the model loads now; /readyz says when it is ready)",
              f"[{args.host}]" if ":" in args.host else args.host, sock.getsockname()[1])
    server.run(sockets=[sock])
    if failure:
        return cli.exit_status(failure[0])
    return cli.EXIT_OK


def _split(names):
    return [name.strip() for name in names.split(",") if name.strip()]


if __name__ == "__main__":
    sys.exit(main())
