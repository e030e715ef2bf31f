"""`gptoss serve`: an OpenAI-compatible HTTP server (fastapi + uvicorn) over the continuous-batching engine.

    gptoss serve --model M [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-concurrency 16]
                 [--cors-origin ORIGIN ...] [--shutdown-grace 5]

On a loopback bind only loopback Host headers are answered (DNS rebinding); cross-origin browser calls are
refused unless --cors-origin names the page's origin; --host 0.0.0.0 without --api-key prints a warning.
SIGTERM / SIGINT: stop accepting, 503 for queued requests, --shutdown-grace seconds for those generating,
then an error event and [DONE] for each stream still open, then the engine thread stops.

Routes: POST /v1/chat/completions, POST /v1/responses (GET /v1/responses/{id}), GET /v1/models, GET /health,
and GET / — a chat page served by the package itself (no CDN, no build step).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["create_app", "serve_command", "serve_in_thread", "add_serve_args", "main"]


def create_app(*args, **kwargs):
    """See gptoss.server.app.create_app (imported lazily: fastapi is only needed to serve)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of `host` in a background thread; yields its base URL
    (http://host:port). The socket is bound before the thread starts, so the port cannot be taken meanwhile.
    Used by `gptoss eval --model`, the server benchmark and the tests."""
    import socket
    import threading
    import time

    import uvicorn

    from ..errors import GptOssError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only for sockets whose
    # proto says TCP, and accepted connections inherit it from this one. With proto 0, each response (headers
    # and body are two writes) waited ≈ 40 ms for the client's delayed ACK: every request, every SSE chunk.
    with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind((host, 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + timeout
            while not server.started:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise GptOssError(f"the server on {host} did not start within {timeout:.0f} s")
                time.sleep(0.02)
            yield f"http://{host}:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(15)


def model_name_for(path: str | Path) -> str:
    """The served model id: the checkpoint folder's name (its parent's for an OpenAI `original/` folder)."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "original" and p.parent.name else p.name


def configure_logging(level: int = logging.INFO) -> None:
    """One stderr line per request (gptoss.server) and engine errors (gptoss.engine)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("gptoss.server", "gptoss.engine"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def serve_command(args: argparse.Namespace, before_start: Callable | None = None, note: str | None = None) -> None:
    """Load the model, start the engine and serve until SIGTERM / SIGINT. `args`: model, host, port, api_key,
    max_concurrency, dtype, device, quiet (and optionally max_queue, max_context, served_model_name,
    cors_origin, shutdown_grace). before_start(engine) lets `gptoss.parallel` mirror the KV cache (args.layout
    set: this rank's shard is loaded).

    Shutdown: the listening socket closes at once; requests still queued for the engine get a 503, those
    generating get `shutdown_grace` seconds to finish, then end with an error (an SSE error event and [DONE]
    when streaming); then the engine thread stops."""
    import asyncio

    import uvicorn

    from ..engine import Engine
    from ..loading import load_model_from_args, prefix_cache_bytes
    from .app import loopback_hosts

    configure_logging()
    grace = float(getattr(args, "shutdown_grace", 5.0))
    cors = list(getattr(args, "cors_origin", None) or [])
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.host.startswith("127.") and not args.api_key:
        print(f"gptoss serve: WARNING: listening on {args.host} with no --api-key: anyone who can reach this "
              "machine can use the model. Pass --api-key KEY (clients send 'Authorization: Bearer KEY') or bind "
              "127.0.0.1.", file=sys.stderr)
    model = load_model_from_args(args)
    name = getattr(args, "served_model_name", None) or model_name_for(args.model)
    engine = Engine(model, max_concurrency=args.max_concurrency, max_queue=getattr(args, "max_queue", 64),
                    max_context=getattr(args, "max_context", None), prefix_cache_bytes=prefix_cache_bytes(args))
    if before_start is not None:
        before_start(engine)
    engine.start()
    try:
        app = create_app(engine, name, api_key=args.api_key, allowed_hosts=loopback_hosts(args.host),
                         cors_origins=cors, reasoning_budget=getattr(args, "reasoning_budget", None))
        state = app.state.gptoss

        class Server(uvicorn.Server):
            """uvicorn's server, telling the app when shutdown begins (uvicorn then stops accepting and waits
            for open connections, which the app ends within the grace period)."""

            async def startup(self, sockets=None) -> None:
                self.loop = asyncio.get_running_loop()
                await super().startup(sockets)

            def handle_exit(self, sig, frame) -> None:
                super().handle_exit(sig, frame)
                # uvicorn re-raises the signal once it has stopped, and SIGTERM's default action would kill
                # the process before engine.close() below: the shutdown is handled, so it is not re-raised
                self._captured_signals.clear()
                if getattr(self, "loop", None) is not None:
                    self.loop.call_soon_threadsafe(state.begin_shutdown, grace)

        note = note or f"{args.max_concurrency} concurrent requests, context {engine.max_context}"
        print(f"gptoss serve: {name} on http://{args.host}:{args.port} (chat page at /, API at /v1, {note})",
              file=sys.stderr)
        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                              access_log=not args.quiet, timeout_graceful_shutdown=grace + 1)).run()
    finally:
        engine.close()
        print("gptoss serve: stopped (engine thread closed)", file=sys.stderr)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The options of `gptoss serve` beyond the model options (loading.add_model_args)."""
    from ..loading import add_prefix_cache_arg

    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests generated together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 503 (default 64)")
    p.add_argument("--max-context", type=int, default=None, help="prompt + max_tokens limit (default: the model's)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder's name)")
    add_prefix_cache_arg(p)
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example) whose pages may call the API; repeatable (default none)")
    p.add_argument("--reasoning-budget", type=int, default=None, metavar="N",
                   help="under a structured output (response_format, text.format, strict tools): at most N analysis "
                        "tokens, then the answer is forced to begin (default: no bound but max_tokens)")
    p.add_argument("--shutdown-grace", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests in flight may still run (default 5)")


def main(argv: list[str] | None = None) -> int:
    """`python -c "from gptoss.server import main; main()" --model M ...` (what `gptoss serve` runs)."""
    from ..loading import add_model_args
    from ..errors import GptOssError

    p = argparse.ArgumentParser(prog="gptoss serve", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_serve_args(p)
    args = p.parse_args(argv)
    try:
        serve_command(args)
    except GptOssError as e:
        print(f"gptoss serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
