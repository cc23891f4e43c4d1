"""`taskorch serve --transport http`: the HTTP app under uvicorn, until SIGTERM or Ctrl-C.

The database is opened before uvicorn starts (a bad path is a one-line error, as with stdio) and
closed after it stops. Shutdown is uvicorn's: stop accepting, let in-flight requests finish (a
long poll may take up to its 60 s wait), close open SSE streams, end the MCP sessions.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
import threading
from typing import Any

from .config import Config
from .service import MAX_WAIT_SECONDS

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = MAX_WAIT_SECONDS + 5  # a long poll in flight finishes


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(config: Config, *, host: str | None = None, port: int | None = None, insecure: bool = False) -> int:
    """Serve HTTP until stopped. Returns the exit code: 0 after a clean stop, 2 when it refuses
    the configuration, 3 (uvicorn's) when it cannot start, e.g. the port is taken. Errors opening
    the database propagate (OSError, TaskorchError) for the CLI to report."""
    import uvicorn

    from .app import check_server_config, create_app
    from .metrics import Metrics
    from .service import open_service

    host = host or config.server.host
    port = port or config.server.port
    if not config.server.api_keys and not is_loopback(host):
        if not insecure:
            print(
                f"taskorch: refusing to serve http on {host} without API keys: anyone who can reach it could "
                "read and change the queue. Set server.api_keys (or TASKORCH_API_KEYS=key1,key2), bind to "
                "127.0.0.1, or pass --insecure to serve it open anyway.",
                file=sys.stderr,
            )
            return 2
        log.warning("serving http on %s WITHOUT authentication (--insecure)", host)
    config = config.model_copy(update={"server": config.server.model_copy(update={"host": host})})
    try:
        check_server_config(config)
    except ValueError as e:
        print(f"taskorch: configuration error: {e}", file=sys.stderr)
        return 2

    servers: list[uvicorn.Server] = []
    stop_requested = False

    def on_sigterm(signum: int, frame: Any) -> None:
        # Outside uvicorn's own handlers: while the database opens, and when uvicorn, after a
        # graceful stop, raises the signal again (the default action would exit with -15, not 0).
        nonlocal stop_requested
        stop_requested = True
        for server in servers:
            server.should_exit = True

    async def run() -> int:
        metrics = Metrics()
        async with open_service(config=config, observer=metrics) as service:
            app = create_app(config, service, metrics=metrics)
            server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    host=host.strip("[]"),
                    port=port,
                    log_config=None,  # the CLI's stderr handler and level apply
                    access_log=False,  # ours (taskorch.access) leaves out query strings
                    proxy_headers=False,  # the peer's address, not X-Forwarded-For: rate limits key on it
                    server_header=False,
                    lifespan="on",
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
                )
            )
            server.should_exit = stop_requested
            servers.append(server)
            try:
                await server.serve()
            except SystemExit as e:  # uvicorn exits 3 when it cannot bind
                return e.code if isinstance(e.code, int) else 3
            return 0 if server.started else 3

    previous = _on_sigterm(on_sigterm)
    try:
        return asyncio.run(run())
    finally:
        _on_sigterm(previous)


def _on_sigterm(handler: Any) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
