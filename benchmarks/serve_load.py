"""Load test of `vitlab serve`: concurrent clients on 127.0.0.1, dynamic batching on against off (`--max-batch 1`).

    python benchmarks/serve_load.py [--model vit-s16] [--clients 16] [--requests 2000] [--max-batch 16]
    python benchmarks/serve_load.py --model vit-ti16 --img-size 32 --clients 2 --requests 20 --warmup 2   # a check

The model is built with random weights (the time of a forward pass does not depend on them) and saved as a vitlab
weights file. For each setting a fresh `python -m vitlab serve` runs in a subprocess; `--warmup` requests are sent
first, then `--requests` requests (the same JPEG photo as the raw body) from `--clients` threads, each with its own
keep-alive connection. Reported per setting: requests/s over the measured requests, p50/p95/p99 latency, errors
(non-200 answers and failed connections), the batch sizes the server ran (from /healthz) and the server's resident
set size (VmRSS) after the warm-up and after each quarter of the measured requests. Prints a markdown table;
`--json` writes the rows too.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitlab import create_model
from vitlab.atomic import atomic_write
from vitlab.weights import save_weights

SOURCE = Path(__file__).resolve().parents[1] / "src"


@dataclass(frozen=True)
class Row:
    setting: str
    max_batch: int
    clients: int
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    batches: dict[str, int]
    rss_before_mb: float
    rss_after_mb: float
    rss_trace_mb: list[float]  # after each quarter of the measured requests

    @property
    def rss_growth(self) -> float:
        return self.rss_after_mb / self.rss_before_mb - 1


def photo_jpeg() -> bytes:
    """scikit-image's chelsea photo as JPEG when scikit-image is installed, else a noise image of the same size."""
    try:
        from skimage.data import chelsea

        pixels = chelsea()
    except ImportError:
        pixels = np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    """A process's resident set size from /proc (Linux); NaN elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(checkpoint: Path, max_batch: int, max_wait_ms: float, threads: int | None, log: Path
           ) -> Iterator[tuple[int, int]]:
    """A `vitlab serve` subprocess on a free local port; yields (port, pid) once /healthz answers."""
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")])}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "vitlab", "serve", str(checkpoint), "--port", str(port), "--max-batch",
               str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


def load(port: int, body: bytes, clients: int, requests: int, on_quarter: Callable[[], None] | None = None
         ) -> tuple[list[float], int, float]:
    """`requests` POSTs shared among `clients` threads; returns the latencies (s), the error count and the wall
    time (s). `on_quarter` is called as each quarter of the requests completes."""
    quarters = {round(requests * share) for share in (0.25, 0.5, 0.75, 1.0)}
    remaining = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if next(remaining, None) is None:
                    break
            started = time.perf_counter()
            try:
                connection.request("POST", "/v1/predict", body=body, headers={"Content-Type": "image/jpeg"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok
                if on_quarter is not None and len(latencies) in quarters:
                    on_quarter()
        connection.close()

    workers = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies, errors[0], time.perf_counter() - started


def measure(setting: str, checkpoint: Path, body: bytes, args: argparse.Namespace, max_batch: int,
            folder: Path) -> Row:
    with server(checkpoint, max_batch, args.max_wait_ms, args.threads, folder / f"{setting}.log") as (port, pid):
        load(port, body, args.clients, args.warmup)
        before = rss_mb(pid)
        trace: list[float] = []
        latencies, errors, wall = load(port, body, args.clients, args.requests, lambda: trace.append(rss_mb(pid)))
        after = rss_mb(pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            batches = json.loads(response.read())["batches"]
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return Row(setting, max_batch, args.clients, args.requests, errors, args.requests / wall, float(p50),
               float(p95), float(p99), batches, before, after, trace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-s16", help="registry name, built with random weights")
    parser.add_argument("--img-size", type=int, help="input size (default: the model's, 224 for vit-s16)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per setting")
    parser.add_argument("--warmup", type=int, default=64, help="requests before the measured ones")
    parser.add_argument("--max-batch", type=int, default=16, help="the batching setting's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    body = photo_jpeg()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as directory:
        folder = Path(directory)
        model = create_model(args.model, img_size=args.img_size)
        checkpoint = save_weights(model, folder / f"{args.model}.safetensors")
        del model
        rows = [measure("batch 1", checkpoint, body, args, 1, folder),
                measure(f"batch {args.max_batch}", checkpoint, body, args, args.max_batch, folder)]
    print(f"{args.model} (random weights), {args.clients} clients, {args.requests} requests per setting, "
          f"--max-wait-ms {args.max_wait_ms}, {len(body):,}-byte JPEG\n")
    print("| setting | req/s | p50 ms | p95 ms | p99 ms | errors | batch sizes run | RSS before → after MB "
          "| RSS at each quarter MB |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for row in rows:
        sizes = ", ".join(f"{size}×{count}" for size, count in row.batches.items())
        print(f"| {row.setting} | {row.requests_per_s:.1f} | {row.p50_ms:.1f} | {row.p95_ms:.1f} | {row.p99_ms:.1f} "
              f"| {row.errors} | {sizes} | {row.rss_before_mb:.0f} → {row.rss_after_mb:.0f} "
              f"({row.rss_growth:+.1%}) | {', '.join(f'{value:.0f}' for value in row.rss_trace_mb)} |")
    print(f"\nbatching / batch 1 throughput: {rows[1].requests_per_s / rows[0].requests_per_s:.2f}x")
    if args.json:
        record = {"model": args.model, "img_size": args.img_size, "weights": "random", "jpeg_bytes": len(body),
                  "rows": [dataclasses.asdict(row) for row in rows]}
        atomic_write(args.json, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
