"""alb-proxy side by side with nginx and HAProxy as TLS terminators, on this machine.

    make bench                      # installs nginx, haproxy, wrk, nghttp2-client, then runs
    .venv/bin/python benchmarks/bench.py [--duration 10] [--runs 3] [--only keepalive,...]

One fixed-response backend (nginx, one worker). Then, one proxy at a time — pinned to CPU 0,
the load generator to CPU 1 — alb-proxy, nginx (1 worker) and HAProxy (1 thread) terminate TLS
with the same certificate and keep-alive connections to the backend. Prints one table of medians
and the ratio of alb-proxy to each peer *measured in the same run* (absolute figures on a shared
2-core machine drift; ratios hold), and writes it to ``benchmarks/results/<date>.md``.

Full handshakes are made with ``openssl s_time -new`` (no session reuse, one request per
connection); resumed ones with ``-reuse``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = "x" * 100
PROXY_CPU, LOAD_CPU = "0", "1"
PORTS = {"backend": 18080, "tls": 18443, "mtls": 18444, "quic": 18443}
TESTS = ("keepalive", "handshake_rsa", "handshake_ecdsa", "resumed", "h2", "mtls", "idle_rss", "h3")
EXTRA = ("scaling", "ceiling")


def sh(*cmd: str, cpu: str | None = None, timeout: float = 600) -> str:
    full = ["taskset", "-c", cpu, *cmd] if cpu is not None else list(cmd)
    done = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    return done.stdout + done.stderr


# -- the servers ---------------------------------------------------------------------------


def write_backend_conf(work: Path) -> Path:
    conf = work / "backend.conf"
    conf.write_text(f"""
worker_processes 1; pid {work}/backend.pid; error_log {work}/backend.err; daemon off;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{PORTS["backend"]};
    location / {{ default_type text/plain; return 200 "{BODY}"; }} }} }}
""")
    return conf


def write_nginx_conf(work: Path, cert: Path, key: Path, ca: Path) -> Path:
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err; daemon off;
events {{ worker_connections 8000; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream be {{ server 127.0.0.1:{PORTS["backend"]}; keepalive 64; }}
  server {{ listen 127.0.0.1:{PORTS["tls"]} ssl http2;
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://be; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }} }}
  server {{ listen 127.0.0.1:{PORTS["mtls"]} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;
    ssl_client_certificate {ca}; ssl_verify_client on;
    location / {{ proxy_pass http://be; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }} }} }}
""")
    return conf


def write_haproxy_conf(work: Path, cert: Path, key: Path, ca: Path) -> Path:
    bundle = work / "haproxy.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    conf = work / "haproxy.cfg"
    conf.write_text(f"""
global
  nbthread 1
  maxconn 8000
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend tls
  bind 127.0.0.1:{PORTS["tls"]} ssl crt {bundle} alpn h2,http/1.1
  default_backend be
frontend mtls
  bind 127.0.0.1:{PORTS["mtls"]} ssl crt {bundle} ca-file {ca} verify required
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:{PORTS["backend"]}
""")
    return conf


def write_alb_conf(work: Path, cert: Path, key: Path, ca: Path, workers: int = 1) -> Path:
    conf = work / f"alb-{workers}.json"
    tls = {
        "certificates": {"default": "c"},
        "default_action": {"forward": "be"},
        "bind": "127.0.0.1",
        "idle_timeout_s": 600,
    }
    conf.write_text(
        json.dumps(
            {
                "instance": {"name": "bench"},
                "workers": workers,
                "state_dir": str(work / "alb-state"),
                "admin": {"listen": "127.0.0.1:18990"},
                "certificates": [
                    {"id": "c", "kind": "server", "cert": str(cert), "key": str(key)},
                    {"id": "ca", "kind": "ca", "cert": str(ca)},
                ],
                "server_groups": [
                    {"id": "be", "servers": [{"host": "127.0.0.1", "port": PORTS["backend"]}]}
                ],
                "listeners": [
                    {"name": "tls", "protocol": "HTTPS", "port": PORTS["tls"], **tls},
                    {
                        "name": "mtls",
                        "protocol": "HTTPS",
                        "port": PORTS["mtls"],
                        "http2": False,
                        "mutual_authentication": {"enabled": True, "ca_certificates": ["ca"]},
                        **tls,
                    },
                    {"name": "quic", "protocol": "QUIC", "port": PORTS["quic"], **tls},
                ],
            }
        )
    )
    return conf


@contextmanager
def running(cmd: list[str], cpu: str | None, ready_port: int, name: str) -> Iterator[int]:
    pin = ["taskset", "-c", cpu] if cpu is not None else []
    proc = subprocess.Popen([*pin, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", ready_port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start") from None
            time.sleep(0.1)
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def proxy_pid(pid: int) -> int:
    """The process doing the work (nginx: its worker, the child of the master)."""
    children = sh("pgrep", "-P", str(pid)).split()
    return int(children[-1]) if children and children[-1].isdigit() else pid


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- the measurements ---------------------------------------------------------------------


def keepalive(duration: int, cpu: str | None = LOAD_CPU, **_: object) -> dict[str, float]:
    out = sh(
        "wrk",
        "-t1",
        "-c32",
        f"-d{duration}s",
        "--latency",
        f"https://localhost:{PORTS['tls']}/",
        cpu=cpu,
    )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    return {"req/s": rps, "p50 ms": _ms(lat.get("50", "0ms")), "p99 ms": _ms(lat.get("99", "0ms"))}


def _ms(text: str) -> float:
    value, unit = float(re.match(r"[\d.]+", text).group(0)), text.lstrip("0123456789.")  # type: ignore[union-attr]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}.get(unit, 1.0)


def s_time(
    duration: int,
    pid: int,
    port: int,
    mode: str,
    extra: tuple[str, ...] = (),
    parallel: int = 4,
    cpu: str | None = LOAD_CPU,
) -> dict[str, float]:
    """Parallel ``openssl s_time`` clients; connections/s and per proxy-CPU-second."""
    before = cpu_seconds(pid)
    pin = ["taskset", "-c", cpu] if cpu is not None else []
    procs = [
        subprocess.Popen(
            [
                *pin,
                "openssl",
                "s_time",
                "-connect",
                f"127.0.0.1:{port}",
                mode,
                "-time",
                str(duration),
                "-www",
                "/",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(parallel)
    ]
    total = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=duration + 60)
        found = re.search(r"(\d+) connections in ([\d.]+)s", out)
        total += int(found.group(1)) if found else 0
    used = cpu_seconds(pid) - before
    return {"handshakes/s": total / duration, "per CPU-s": total / used if used else 0.0}


def idle_rss(count: int, pid: int, **_: object) -> dict[str, float]:
    """RSS growth per idle TLS connection (``count`` connections opened, then held)."""

    async def hold() -> float:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        before = rss_kib(pid)
        conns = []
        for _ in range(count // 100):
            conns += await asyncio.gather(
                *(
                    asyncio.open_connection(
                        "127.0.0.1", PORTS["tls"], ssl=ctx, server_hostname="localhost"
                    )
                    for _ in range(100)
                )
            )
        await asyncio.sleep(1)
        grown = (rss_kib(pid) - before) / len(conns)
        for _, writer in conns:
            writer.close()
        return grown

    return {"KiB/conn": asyncio.run(hold())}


def h2load(duration: int, **_: object) -> dict[str, float]:
    out = sh(
        "h2load",
        "-c32",
        "-m10",
        "-D",
        str(duration),
        f"https://localhost:{PORTS['tls']}/",
        cpu=LOAD_CPU,
    )
    found = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    return {"req/s": float(found.group(1)) if found else 0.0}


def h3(duration: int, **_: object) -> dict[str, float]:
    out = sh(
        sys.executable,
        str(ROOT / "benchmarks/h3load.py"),
        "--port",
        str(PORTS["quic"]),
        "--duration",
        str(duration),
        cpu=LOAD_CPU,
    )
    found = re.search(r"= (\d+) req/s", out)
    return {"req/s": float(found.group(1)) if found else 0.0}


def scaling(work: Path, cert: Path, key: Path, ca: Path, duration: int, runs: int) -> str:
    """alb-proxy alone with ``workers: 1`` and ``workers: 2``, nothing pinned: how far a second
    worker carries on this machine, where the load generator shares the same two cores."""
    figures: dict[int, dict[str, list[float]]] = {}
    for _ in range(runs):
        for workers in (1, 2):
            cmd = [
                sys.executable,
                "-P",  # the installed (compiled) package, not the source tree in the cwd
                "-m",
                "alb_proxy",
                "run",
                "--config",
                str(write_alb_conf(work, cert, key, ca, workers=workers)),
            ]
            with running(cmd, None, PORTS["tls"], f"alb-proxy x{workers}") as pid:
                time.sleep(1.0)
                ka = keepalive(duration, cpu=None)["req/s"]
                hs = s_time(duration, pid, PORTS["tls"], "-new", cpu=None)["handshakes/s"]
            by = figures.setdefault(workers, {})
            by.setdefault("keep-alive req/s", []).append(ka)
            by.setdefault("full handshakes/s", []).append(hs)
    lines = [
        "| alb-proxy workers | keep-alive req/s | full handshakes/s (ECDSA) |",
        "|---|---|---|",
    ]
    med = {w: {k: statistics.median(v) for k, v in f.items()} for w, f in figures.items()}
    for workers, row in med.items():
        lines.append(
            f"| {workers} | {row['keep-alive req/s']:.0f} | {row['full handshakes/s']:.0f} |"
        )
    one, two = med[1], med[2]
    lines.append(
        f"| 2 ÷ 1 | {two['keep-alive req/s'] / one['keep-alive req/s']:.2f}x | "
        f"{two['full handshakes/s'] / one['full handshakes/s']:.2f}x |"
    )
    return "\n".join(lines)


def ceiling(work: Path, cert: Path, key: Path, ca: Path, duration: int, runs: int) -> str:
    """Keep-alive requests/s of two bare Python relays (``bare_relay.py``: TLS, llhttp both
    ways, nothing else) beside HAProxy, pinned as in the main table: the most a Python proxy
    gets on this machine, over alb-proxy's TLS layer and over uvloop's built-in one."""
    relay = [sys.executable, "-P", str(ROOT / "benchmarks/bare_relay.py")]
    where = ["--port", str(PORTS["tls"]), "--backend", str(PORTS["backend"])]
    pair = ["--cert", str(cert), "--key", str(key)]
    servers = {
        "HAProxy": ["haproxy", "-f", str(write_haproxy_conf(work, cert, key, ca))],
        "bare relay, uvloop's TLS": [*relay, "--tls", "uvloop", *where, *pair],
        "bare relay, alb-proxy's TLS layer": [*relay, "--tls", "memorybio", *where, *pair],
    }
    figures: dict[str, list[float]] = {}
    for _ in range(runs):
        for name, cmd in servers.items():
            with running(cmd, PROXY_CPU, PORTS["tls"], name):
                time.sleep(0.5)
                figures.setdefault(name, []).append(keepalive(duration)["req/s"])
    med = {name: statistics.median(values) for name, values in figures.items()}
    lines = ["| server (one core) | keep-alive req/s | ÷ HAProxy |", "|---|---|---|"]
    lines += [f"| {n} | {v:.0f} | {v / med['HAProxy']:.2f}x |" for n, v in med.items()]
    return "\n".join(lines)


# -- driving ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--only", default=",".join(TESTS + EXTRA))
    args = parser.parse_args()
    only = args.only.split(",")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every server
    missing = [t for t in ("nginx", "haproxy", "wrk", "h2load", "taskset") if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (make bench installs them)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="alb-bench-"))
    sh(sys.executable, "-P", "-m", "alb_proxy", "certs", "dev", "--out", str(work / "certs"))
    certs = work / "certs"
    keys = {
        "ecdsa": (certs / "site.pem", certs / "site.key"),
        "rsa": (certs / "site-rsa.pem", certs / "site-rsa.key"),
    }
    client = ("-cert", str(certs / "client.pem"), "-key", str(certs / "client.key"))
    results: dict[str, dict[str, dict[str, list[float]]]] = {}

    def record(proxy: str, test: str, figures: dict[str, float]) -> None:
        for key, value in figures.items():
            results.setdefault(test, {}).setdefault(key, {}).setdefault(proxy, []).append(value)

    with running(
        ["nginx", "-c", str(write_backend_conf(work))], LOAD_CPU, PORTS["backend"], "backend"
    ):
        for key_type, (cert, key) in keys.items():
            confs = {
                "alb-proxy": [
                    sys.executable,
                    "-P",  # the installed (compiled) package, not the source tree in the cwd
                    "-m",
                    "alb_proxy",
                    "run",
                    "--config",
                    str(write_alb_conf(work, cert, key, certs / "client-ca.pem")),
                ],
                "nginx": [
                    "nginx",
                    "-c",
                    str(write_nginx_conf(work, cert, key, certs / "client-ca.pem")),
                ],
                "haproxy": [
                    "haproxy",
                    "-f",
                    str(write_haproxy_conf(work, cert, key, certs / "client-ca.pem")),
                ],
            }
            plan: list[tuple[str, Callable[..., dict[str, float]], dict[str, object]]] = []
            if key_type == "ecdsa":
                plan += [
                    ("keepalive", keepalive, {}),
                    ("h2", h2load, {}),
                    ("handshake_ecdsa", s_time, {"mode": "-new", "port": PORTS["tls"]}),
                    ("resumed", s_time, {"mode": "-reuse", "port": PORTS["tls"]}),
                    ("mtls", s_time, {"mode": "-new", "port": PORTS["mtls"], "extra": client}),
                    ("idle_rss", idle_rss, {"count": args.idle}),
                    ("h3", h3, {}),
                ]
            else:
                plan += [("handshake_rsa", s_time, {"mode": "-new", "port": PORTS["tls"]})]
            plan = [p for p in plan if p[0] in only]
            for _ in range(args.runs):
                for proxy, cmd in confs.items():
                    if rss_tests := [p for p in plan if p[0] != "h3" or proxy == "alb-proxy"]:
                        with running(cmd, PROXY_CPU, PORTS["tls"], proxy) as pid:
                            time.sleep(0.5)
                            worker = proxy_pid(pid)
                            for test, fn, kwargs in rss_tests:
                                record(
                                    proxy, test, fn(duration=args.duration, pid=worker, **kwargs)
                                )
    report = render(results)
    cert, key = keys["ecdsa"]
    # scaling leaves both CPUs to the proxy's workers; ceiling pins like the main table
    for section, backend_cpu in ((scaling, None), (ceiling, LOAD_CPU)):
        if section.__name__ in only:
            backend = ["nginx", "-c", str(write_backend_conf(work))]
            with running(backend, backend_cpu, PORTS["backend"], "backend"):
                report += "\n\n" + section(
                    work, cert, key, certs / "client-ca.pem", args.duration, args.runs
                )
    print(report)
    out = ROOT / "benchmarks" / "results" / f"{dt.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    build = sh(sys.executable, "-P", "-m", "alb_proxy", "--version").strip()
    section = (
        f"# Benchmarks {dt.datetime.now().isoformat(timespec='minutes')}\n\n"
        f"`benchmarks/bench.py --duration {args.duration} --runs {args.runs}` on "
        f"{os.cpu_count()} CPUs (proxy on CPU {PROXY_CPU}, load on CPU {LOAD_CPU}); "
        f"{build}; medians.\n\n{report}\n"
    )
    earlier = out.read_text() + "\n" if out.exists() else ""  # a day's runs, oldest first
    out.write_text(earlier + section)
    print(f"\nwritten to {out.relative_to(ROOT)}")
    return 0


def render(results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    lines = [
        "| test | figure | alb-proxy | nginx | haproxy | alb/nginx | alb/haproxy |",
        "|---|---|---|---|---|---|---|",
    ]
    for test in TESTS:
        for figure, by_proxy in results.get(test, {}).items():
            med = {p: statistics.median(v) for p, v in by_proxy.items()}
            alb = med.get("alb-proxy", 0.0)

            def ratio(peer: str, alb: float = alb, med: dict[str, float] = med) -> str:
                return f"{alb / med[peer]:.2f}x" if med.get(peer) else "-"

            cells = [
                f"{med[p]:.1f}" if p in med else "-" for p in ("alb-proxy", "nginx", "haproxy")
            ]
            lines.append(
                f"| {test} | {figure} | {' | '.join(cells)} | {ratio('nginx')} | "
                f"{ratio('haproxy')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
