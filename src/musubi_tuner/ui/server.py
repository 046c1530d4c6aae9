"""Start the studio: a local web app over the dataset, plan, train and generate commands.

    musubi-ui [--workspace studio] [--port 7860]              # http://127.0.0.1:7860, this machine only
    musubi-ui --listen 0.0.0.0 [--token SECRET]                # other hosts, with a token (one is made if not given)

Every file the studio writes (dataset configs, caches, LoRAs, videos, logs) lies inside the workspace folder.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from musubi_tuner.cli import Parser, count, path
from musubi_tuner.errors import UserError, run_cli

TOKEN_VARIABLE = "MUSUBI_UI_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="musubi-ui", description=__doc__)
    p.add_argument("--workspace", type=path, default="studio", help="the folder the studio writes to (made if missing)")
    p.add_argument("--port", type=count(1, 65535), default=7860, help="TCP port")
    p.add_argument("--listen", nargs="?", const="0.0.0.0", default=None, metavar="ADDRESS",
                   help="serve other hosts on ADDRESS (0.0.0.0 when given alone); needs a token")
    p.add_argument("--token", default=None, help=f"the token other hosts must give (default ${TOKEN_VARIABLE}, or a new random one)")
    return p


def serving(args) -> tuple[str, str | None]:
    """(address to bind, token or None). Loopback needs no token unless one is given; --listen always has one."""
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    if token is not None and len(token) < 8:
        raise UserError("--token: use at least 8 characters (or leave it out for a random one)")
    if args.listen is None:
        return "127.0.0.1", token
    return args.listen, token or secrets.token_urlsafe(18)


def _stop_gracefully_on_sighup(server) -> list[int]:
    """A closed terminal (SIGHUP) stops the server as Ctrl-C does, through uvicorn's graceful shutdown, instead of an
    exception inside a request (a traceback, and at times a server left serving without a terminal); not under nohup.
    Returns the list the signal is recorded in."""
    import signal

    received: list[int] = []
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        def hang_up(signum, frame):
            received.append(signum)
            server.should_exit = True

        signal.signal(signal.SIGHUP, hang_up)
    return received


GRACE_SECONDS = 5


def _bound(host: str, port: int):
    """A listening socket on (host, port), or a UserError naming --port when another program holds it."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds: a port in TIME_WAIT is free)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: in use on {host} (another studio, or another program); choose another --port") from None
        raise UserError(f"--port {port}: cannot listen on {host} ({e.strerror or e})") from None
    sock.set_inheritable(False)
    return sock


def main(argv=None) -> None:
    def run(argv):
        args = build_parser().parse_args(argv)
        host, token = serving(args)
        import uvicorn

        from musubi_tuner.ui.app import create_app
        from musubi_tuner.ui.workspace import Workspace

        workspace = Workspace(args.workspace)
        listening = _bound(host, args.port)  # (before the address is printed: it announced another studio's: fuzz_ac 6)
        if not workspace.has_demo_assets():
            print(f"workspace {workspace.root}: writing the demo's tiny models and dataset (first start only)", flush=True)
        workspace.demo_assets()
        app = create_app(workspace, token=token, loopback_only=args.listen is None)
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        print(f"studio at http://{shown_host}:{args.port}/" + (f"?token={token}" if token else ""), flush=True)
        # (a stop waits at most GRACE_SECONDS for the requests in flight: a stalled upload held Ctrl-C off for as long as
        # its client kept the connection: fuzz_ac 7)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACE_SECONDS))
        hung_up = _stop_gracefully_on_sighup(server)
        server.run(sockets=[listening])  # (not uvicorn.run, which swallows the Ctrl-C or SIGTERM it re-raises after its
        # graceful stop)
        if hung_up:
            from musubi_tuner.errors import Terminated

            raise Terminated(hung_up[0], "hung up")

    run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
