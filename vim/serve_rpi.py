"""Serve Vision Mamba over HTTP: the model stays loaded, so classifying costs a forward, not a start-up.

    python vim/serve_rpi.py -c CKPT                        # http://127.0.0.1:8000/ (page) and /v1/classify
    python vim/serve_rpi.py --host 0.0.0.0 --token SECRET  # the LAN, with a token
    curl --data-binary @photo.jpg localhost:8000/v1/classify

A thin shell: parse the options (infer_rpi.py's model options plus the server's), build the app
(`vim_rpi.server.create_app`) and run it on uvicorn. The model loads in the background after the
port is open; /readyz turns 200 once it is warm. SIGTERM or SIGINT: stop accepting, finish the
queued requests (at most --grace-s), exit 0. Needs the optional packages in
scripts/requirements-serve.txt (FastAPI, uvicorn, python-multipart).
"""

import argparse
import ipaddress
import logging
import os
import signal
import sys

try:
    import uvicorn

    from vim_rpi import cli
    from vim_rpi.server import Settings, create_app
except ModuleNotFoundError as missing:
    sys.exit(f"error: {missing}; the server needs its optional packages: "
             f"pip install -r scripts/requirements-serve.txt (and the project: pip install -e causal-conv1d "
             f"-e mamba-1p1p1 -e .)")

_log = logging.getLogger("vim_rpi.serve")

TOKEN_ENV = "VIM_SERVE_TOKEN"

EPILOG = f"""\
endpoints:
  POST /v1/classify?topk=5   the image as the raw body (curl --data-binary @photo.jpg) or as the
                             multipart field "image" -> {{"model", "topk": [{{"index", "label", "prob"}}],
                             "timing_ms": {{"queue", "preprocess", "inference"}}}}
  GET  /v1/info              model, checkpoint, threads, quantize, torch version, backends, queue
  GET  /healthz, /readyz     200 while running; 200 once the model is warm (503 before)
  GET  /                     a web page: pick or take a photo, see its top-5
  GET  /docs, /openapi.json  the API's description
  Errors are JSON {{"error": "..."}}: 4xx for a client's mistake, 503 (with Retry-After) when the
  queue is full or the model is loading.

environment:
  {TOKEN_ENV}            the token, if --token is not given

{cli.EXIT_CODES_HELP}"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve_rpi.py",
        description="Serve Vision Mamba (Vim) image classification over HTTP: an API and a web page.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 serves the LAN [%(default)s]")
    parser.add_argument("--port", type=int, default=8000, help="TCP port [%(default)s]")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                        help=f"require 'Authorization: Bearer TOKEN' on /v1/* [${TOKEN_ENV}; none]")
    parser.add_argument("--queue", type=int, default=16, metavar="N",
                        help="most requests waiting at once; more are answered 503 [%(default)s]")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="most waiting requests run together in one forward; 1: no batching [%(default)s]")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                        help="larger uploads are refused with 413 [%(default)s]")
    parser.add_argument("--upload-timeout-s", type=float, default=60.0, metavar="S",
                        help="a slower upload is refused with 408, freeing its place in the queue [%(default)s]")
    parser.add_argument("--grace-s", type=float, default=10.0, metavar="S",
                        help="on SIGTERM/SIGINT, time left for queued requests [%(default)s]")
    cli.add_model_arguments(parser)
    cli.add_runtime_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no request log)")
    return parser


def check_args(parser, args) -> None:
    """Usage errors (exit 2) before anything slow."""
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    for flag in ("queue", "max_batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.max_upload_mb > 0:
        parser.error(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if not args.upload_timeout_s > 0:
        parser.error(f"--upload-timeout-s must be > 0, got {args.upload_timeout_s}")
    if not args.grace_s >= 0:
        parser.error(f"--grace-s must be >= 0, got {args.grace_s}")
    cli.check_environment(parser, args)


def _is_loopback(host) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _exit_quietly(signum, frame):
    """SIGTERM/SIGINT outside uvicorn's own handling (before it starts, or when it re-raises the
    signal after its graceful shutdown): a clean exit 0."""
    raise SystemExit(cli.EXIT_OK)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    cli.setup(args.quiet)
    if not _is_loopback(args.host) and not args.token:
        _log.warning("warning: serving %s without a token: anyone on the network can use the API; "
                     "set --token or %s", args.host, TOKEN_ENV)
    if args.trust_checkpoint:
        _log.warning("--trust-checkpoint: unpickling the checkpoint may run code from it")

    failure = []

    def on_load_error(error):
        failure.append(error)
        server.should_exit = True

    settings = Settings(
        classifier_options=dict(checkpoint=args.checkpoint, model=args.model, threads=args.threads,
                                quantize=args.quantize, input_size=args.input_size,
                                exact_preprocess=args.exact_preprocess, backend=args.backend, device=args.device,
                                max_image_mb=args.max_image_mb,
                                ema=args.ema, trust_checkpoint=args.trust_checkpoint),
        token=args.token, queue=args.queue, max_batch=args.max_batch, max_upload_mb=args.max_upload_mb,
        upload_timeout_s=args.upload_timeout_s, grace_s=args.grace_s, on_load_error=on_load_error)
    config = uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=args.grace_s, server_header=False)
    server = uvicorn.Server(config)
    _log.info("serving on http://%s:%d/ (the model loads now; /readyz says when it is ready)",
              f"[{args.host}]" if ":" in args.host else args.host, args.port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    server.run()
    if failure:
        return cli.exit_status(failure[0])
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
