"""`arbor serve`: the model behind an OpenAI-compatible HTTP API (arbor_cli/serve/)."""

from __future__ import annotations

import importlib.util
from typing import Annotated, Optional

import typer

from arbor_core.errors import UsageError

from .common import GlobalOptions, handle_errors, load_model, model_options, notice, warn

SERVE_EXTRA = "pip install 'arbor-cli[serve]'"


def register(app: typer.Typer) -> None:
    app.command(help="Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                     "/v1/models, /health): several requests decoded at once (--parallel), a bounded queue.")(serve)


@handle_errors
@model_options
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="ARBOR_API_KEY", show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on every request.")]
    = None,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Requests that may wait beside the running one; "
                                            "more are answered 503.")] = 16,
    parallel: Annotated[Optional[int], typer.Option("--parallel", metavar="N", show_default=False,
                                                    help="Requests decoded at once, each joining the running batch "
                                                    "at its next step (default: as many as free memory holds, at "
                                                    "most 16; 1: one at a time).")] = None,
    served_name: Annotated[Optional[str], typer.Option("--served-model-name", show_default=False,
                                                       help="The model id clients ask for (default: the model's "
                                                       "name, or its file or folder name).")] = None,
    *, opts: GlobalOptions,
) -> None:
    from ..serve import LOOPBACK, Server

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"arbor serve needs {' and '.join(missing)}: {SERVE_EXTRA}")
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    if queue_size < 0:
        raise UsageError(f"--queue-size must be 0 or more, got {queue_size}")
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    if host not in LOOPBACK and not api_key:
        warn(f"serving on {host} without --api-key: anyone who can reach this machine can use the model")
    from ..serve import listen  # uvicorn's and Starlette's: only once they are known to be installed
    from ..serve.app import create_app

    sock = listen.bind(host, port)  # a port in use is one line before the model loads or anything is announced
    try:
        model = load_model(opts)
        server = Server(model, queue_size=queue_size, api_key=api_key, name=served_name, parallel=parallel)
        shown = f"[{host}]" if ":" in host else host
        notice(f"serving {server.name} at http://{shown}:{port}/v1 (context up to {server.max_context:,} tokens, "
               f"{server.parallel} at once, {queue_size} may wait); Ctrl-C stops")
        listen.serve(create_app(server), sock, server.worker.stop,
                     max_connections=max(listen.DEFAULT_MAX_CONNECTIONS, 2 * (queue_size + server.parallel)))
    finally:
        sock.close()
