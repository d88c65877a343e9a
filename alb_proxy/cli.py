"""Command line: ``alb-proxy run``, ``alb-proxy certs dev``, ``alb-proxy demo-backend``.

Exit codes: 0 done, 1 runtime failure (e.g. a port already in use), 2 refused input (a config
or certificate problem, printed one per line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from alb_proxy import __version__, build, ctl
from alb_proxy.errors import AlbError, ConfigError

DEFAULT_CONFIG = Path("configs/example.yaml")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one JSON object when ``--json`` was asked for: scripts parse every
    answer, mistakes in their own command lines included."""

    wants_json = False

    def error(self, message: str) -> NoReturn:
        if self.wants_json:
            error = {"code": "usage", "message": message, "usage": self.format_usage().strip()}
            print(json.dumps({"error": error}, indent=2))
            raise SystemExit(2)
        super().error(message)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _Parser.wants_json = "--json" in argv
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        result: int = args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="alb-proxy",
        description="TLS-termination edge proxy: a cloud load balancer listener, on one host",
    )
    parser.add_argument(
        "--version", action="version", version=f"alb-proxy {__version__} ({build()})"
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy daemon")
    run.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"YAML config file (default {DEFAULT_CONFIG})",
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    run.add_argument(
        "--ephemeral-ports",
        action="store_true",
        help="bind listeners and the admin API to ports the OS picks",
    )
    run.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="write the bound ports as one JSON line to FD once serving",
    )
    run.add_argument(
        "--check", action="store_true", help="validate the config and certificates, then exit"
    )
    run.set_defaults(handler=_run)

    certs = commands.add_parser("certs", help="certificates").add_subparsers(metavar="ACTION")
    dev = certs.add_parser("dev", help="write a local CA and the example config's certificates")
    dev.add_argument("--out", type=Path, default=Path("certs"))
    dev.set_defaults(handler=_certs_dev)
    ctl.add_commands(commands, certs)

    # Started by the daemon, one per worker slot (``workers/worker.py``); not for people.
    worker = commands.add_parser("worker")
    worker.add_argument("--slot", type=int, required=True)
    worker.add_argument("--channel-fd", type=int, required=True)
    worker.add_argument("--log-level", default="INFO")
    worker.add_argument("--drain-timeout", type=float, required=True)
    worker.set_defaults(handler=_worker)

    demo = commands.add_parser("demo-backend", help="run an HTTP echo server to forward to")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8081)
    demo.set_defaults(handler=_demo_backend)
    return parser


def _run(args: argparse.Namespace) -> int:
    from alb_proxy.config.load import load_config
    from alb_proxy.config.rules import check_config
    from alb_proxy.control.snapshot import build_snapshot, certificate_problems
    from alb_proxy.control.store import StateError
    from alb_proxy.daemon import Daemon, RunOptions
    from alb_proxy.observability.log import setup_logging
    from alb_proxy.observability.metrics import Metrics
    from alb_proxy.upstream.pool import ConnectionPool

    setup_logging(args.log_level)
    try:
        config = load_config(args.config, check=False)
        problems = check_config(config)
        if problems:
            raise ConfigError([*problems, *certificate_problems(config)])
        if args.check:
            # Everything a start would check, without touching the state store.
            build_snapshot(config, ConnectionPool(), Metrics())
            print(f"{args.config}: ok")
            return 0
        daemon = Daemon(
            config,
            args.config,
            RunOptions(
                ephemeral_ports=args.ephemeral_ports,
                ready_fd=args.ready_fd,
                log_level=args.log_level,
            ),
        )
    except StateError as exc:
        print(f"alb-proxy: cannot serve: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"alb-proxy: {args.config}: refused:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except AlbError as exc:
        print(f"alb-proxy: {args.config}: refused: {exc}", file=sys.stderr)
        return 2
    import uvloop

    try:
        return uvloop.run(daemon.run())
    except OSError as exc:
        print(f"alb-proxy: cannot serve: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _worker(args: argparse.Namespace) -> int:
    import uvloop

    from alb_proxy.observability.log import set_context, setup_logging
    from alb_proxy.workers.worker import serve_worker

    setup_logging(args.log_level)
    set_context(worker=args.slot)
    result: int = uvloop.run(serve_worker(args.slot, args.channel_fd, args.drain_timeout))
    return result


def _certs_dev(args: argparse.Namespace) -> int:
    from alb_proxy.certs.dev import write_dev_certificates

    for path in write_dev_certificates(args.out, now=datetime.now(UTC)):
        print(path)
    return 0


def _demo_backend(args: argparse.Namespace) -> int:
    from alb_proxy.demo_backend import run_demo_backend

    try:
        run_demo_backend(args.host, args.port)
    except OSError as exc:
        print(f"alb-proxy demo-backend: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0
