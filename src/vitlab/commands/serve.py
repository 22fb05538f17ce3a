"""`vitlab serve`: an HTTP API and a web page for one checkpoint (needs the `serve` extra)."""

from __future__ import annotations

import argparse

from vitlab.commands import positive_int
from vitlab.errors import VitlabError

INSTALL_HINT = "`vitlab serve` needs the serve extra: pip install 'vitlab[serve]'"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="HTTP API and web page: top-k classes and attention rollout",
                                   description="Serve a checkpoint over HTTP: POST /v1/predict, GET /v1/model, "
                                               "GET /healthz, the page at / and the OpenAPI docs at /docs.")
    parser.add_argument("checkpoint", help="anything `vitlab predict` takes: a run directory or a weights file")
    parser.add_argument("--model", help="registry name, for weight files that do not name their model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=positive_int, default=16, help="most requests run in one forward pass")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the first request of a batch waits for others to join it")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="server processes, each with its own copy of the model")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body accepted")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on the CPU (as training's amp=auto)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise VitlabError(INSTALL_HINT) from None
    from vitlab.serve.app import ServeConfig, run_server
    from vitlab.serve.model import ServedModel

    if args.max_wait_ms < 0 or args.max_upload_mb <= 0 or not 0 <= args.port <= 65535:
        raise VitlabError("--max-wait-ms must be >= 0, --max-upload-mb > 0 and --port in 0-65535")
    config = ServeConfig(args.checkpoint, args.model, args.host, args.port, args.max_batch, args.max_wait_ms,
                         args.workers, args.max_upload_mb, device=args.device, precision=args.precision)
    served = ServedModel(config.checkpoint, config.model_name, config.device, config.precision)
    run_server(config, served)
    return 0
