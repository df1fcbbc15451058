"""``feda2v serve``: a local page to upload or record a clip and see its pictures and nearest classes.

It also shows the run's report.

Needs the optional extra: ``pip install 'feda2v[serve]'``. Binds 127.0.0.1 unless ``--host`` says
otherwise; the pipeline is loaded once before the page accepts requests. :mod:`ops.serve.app` documents
the page, the upload bound and the queue.
"""

from __future__ import annotations

import argparse
import logging

from common.errors import FedA2VError
from ops.cli.options import add_pipeline_options, pipeline_from_args

log = logging.getLogger(__name__)


class ServeExtraMissing(FedA2VError):
    """The optional serve dependencies are not installed."""


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ops.serve.app import create_app
    except ImportError as err:
        raise ServeExtraMissing(f"feda2v serve needs the optional extra: pip install 'feda2v[serve]' ({err})") from None
    pipe = pipeline_from_args(args)
    pipe.backend()  # load the render model now, not on the first request
    from common.imagine.export import find_run

    app = create_app(pipe, find_run(args.run) if args.run else None, args.max_upload_mb, args.queue, args.n or None)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines; the page has no authentication", args.host)
    print(f"feda2v serve: http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", server_header=False, date_header=False)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="a local page: upload or record a clip, see its pictures (feda2v[serve])",
                       description=__doc__.splitlines()[0])
    add_pipeline_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted, MiB (default 20)")
    p.add_argument("--queue", type=int, default=8, help="requests that may wait for the model before 'busy' (default 8)")
    p.add_argument("-n", type=int, default=0, help="images per clip (default: the pipeline's, 2)")
    p.set_defaults(func=cmd_serve)
