"""Memory while streaming: RSS of the proxy during a 1 GiB HTTPS download and a 200 MiB upload.

    .venv/bin/python benchmarks/transfer_rss.py [--size-mib 1024] [--upload-mib 200]

Starts the demo backend and alb-proxy (ephemeral ports, generated certificates), drives curl
through the HTTPS listener, samples the proxy's VmRSS every 50 ms, and prints baseline, peak and
growth with the throughput curl saw. Streaming means the growth stays a few MiB whatever the size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pid))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--upload-mib", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alb-bench-"))
    cli = [sys.executable, "-P", "-m", "alb_proxy"]  # -P: the installed package, not the cwd
    subprocess.run(
        [*cli, "certs", "dev", "--out", str(work / "certs")], check=True, capture_output=True
    )
    backend = subprocess.Popen([*cli, "demo-backend", "--port", "0"], stdout=subprocess.PIPE)
    assert backend.stdout is not None
    backend_port = int(backend.stdout.readline().decode().rsplit(":", 1)[1])
    config = {
        "instance": {"name": "bench"},
        "workers": 1,  # the process sampled is the one moving the bytes
        "state_dir": str(work / "state"),
        "admin": {"listen": "127.0.0.1:9900"},
        "certificates": [
            {
                "id": "c",
                "kind": "server",
                "cert": str(work / "certs/site.pem"),
                "key": str(work / "certs/site.key"),
            }
        ],
        "server_groups": [{"id": "sg", "servers": [{"host": "127.0.0.1", "port": backend_port}]}],
        "listeners": [
            {
                "name": "h",
                "protocol": "HTTPS",
                "port": 443,
                "bind": "127.0.0.1",
                "certificates": {"default": "c"},
                "default_action": {"forward": "sg"},
            }
        ],
    }
    (work / "alb.json").write_text(json.dumps(config))  # JSON is YAML
    read_fd, write_fd = os.pipe()
    proxy = subprocess.Popen(
        [
            *cli,
            "run",
            "--config",
            str(work / "alb.json"),
            "--ephemeral-ports",
            "--ready-fd",
            str(write_fd),
        ],
        pass_fds=(write_fd,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    port = json.loads(os.read(read_fd, 65536))["listeners"]["h"]
    url = f"https://localhost:{port}/"
    try:
        baseline = rss_kib(proxy.pid)
        for label, extra, nbytes in (
            (
                "download",
                [f"{url}?bytes={args.size_mib << 20}", "-o", "/dev/null"],
                args.size_mib << 20,
            ),
            (
                "upload",
                ["-T", "-", "-H", "Transfer-Encoding: chunked", url, "-o", "/dev/null"],
                args.upload_mib << 20,
            ),
        ):
            sampler = Sampler(proxy.pid)
            sampler.start()
            started = time.perf_counter()
            feed = (
                subprocess.Popen(["head", "-c", str(nbytes), "/dev/zero"], stdout=subprocess.PIPE)
                if label == "upload"
                else None
            )
            subprocess.run(
                ["curl", "-sS", "--cacert", str(work / "certs/ca.pem"), *extra],
                stdin=feed.stdout if feed else None,
                check=True,
            )
            elapsed = time.perf_counter() - started
            sampler.stop.set()
            sampler.join()
            print(
                f"{label:8} {nbytes >> 20:5d} MiB in {elapsed:5.2f} s "
                f"({nbytes / elapsed / 2**20:6.0f} MiB/s)  proxy RSS baseline "
                f"{baseline / 1024:.1f} MiB, peak {sampler.peak / 1024:.1f} MiB, "
                f"growth {(sampler.peak - baseline) / 1024:.1f} MiB"
            )
    finally:
        proxy.terminate()
        backend.terminate()
        proxy.wait()
        backend.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
