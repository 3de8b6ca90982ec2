#!/usr/bin/env python3
"""Load benchmark: N submits from C concurrent clients that poll every 0.5 s, against a real server.

Each client does what the official SDKs do: submit a prediction, poll
`GET /api/v3/predictions/{id}/result` every --poll-s until it is terminal, then submit the next.
At the end every accepted id is looked up again and the prediction history is read back, so a
job that was accepted but never finished, or a row that went missing, is counted as lost.
Printed: a table of submits, outcomes, losses, wall time, throughput and the p50/p99/max
latency of polls and submits. Exit status 0 only when every accepted job completed and none
was lost. Bounded: --timeout-s caps the whole run, every request has a timeout.

By default it starts its own `skyreels-local serve --model tiny-random --device cpu` on a free
loopback port with a fresh data directory and stops it afterwards; --base-url and --api-key
point it at a server that is already running instead (loopback only: this is not a tool to
load other people's machines).

    python scripts/load_bench.py                                # 200 submits, 20 clients, tiny model
    python scripts/load_bench.py --submits 20 --clients 5 --steps 1
    python scripts/load_bench.py --base-url http://127.0.0.1:8000 --api-key KEY
    python scripts/load_bench.py --cluster 1,2,4                # API + Redis + K CPU workers, per K

--cluster K1,K2,... runs the same load once per K against a cluster on this machine: a
`redis-server` on a free loopback port (Debian's package; no persistence), `serve --broker
--workers 0`, and K `skyreels-local worker` processes, each in its own empty working directory
(no shared files: everything goes through Redis) and limited to one CPU thread, so K is the
number of cores the workers may use. It prints each run's table, then the scaling: throughput per
K and its ratio to the first K, lost jobs, p99 poll latency and how many jobs each worker ran.
Report the scaling, not the absolute seconds (a tiny model on a CPU).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

MODEL_PATH = "/api/v3/wavespeed-ai/SkyReels-V1"
TERMINAL = ("completed", "failed", "cancelled")
REQUEST_TIMEOUT_S = 30.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LoadReport:
    submits: int
    clients: int
    poll_s: float
    accepted: int = 0
    rejected_429: int = 0
    submit_errors: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    lost: list[str] = field(default_factory=list)  # accepted ids that never reached a terminal state
    history_missing: list[str] = field(default_factory=list)  # accepted ids absent from the history
    wall_s: float = 0.0
    poll_latencies_s: list[float] = field(default_factory=list)
    submit_latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.accepted == self.submits
            and self.completed == self.accepted
            and not self.lost
            and not self.history_missing
        )

    @property
    def throughput(self) -> float:
        return self.completed / self.wall_s if self.wall_s else 0.0

    def rows(self) -> list[tuple[str, str]]:
        def ms(values: list[float]) -> str:
            return (
                " / ".join(f"{percentile(values, q) * 1000:.1f}" for q in (50, 99))
                + f" / {max(values, default=math.nan) * 1000:.1f} ms"
            )

        return [
            (
                "clients x submits",
                f"{self.clients} x {self.submits / max(self.clients, 1):g} = {self.submits}",
            ),
            ("submits accepted", str(self.accepted)),
            ("submits refused 429 (retried)", str(self.rejected_429)),
            ("completed / failed / cancelled", f"{self.completed} / {self.failed} / {self.cancelled}"),
            ("lost (accepted, never terminal)", str(len(self.lost))),
            ("missing from history", str(len(self.history_missing))),
            ("wall time", f"{self.wall_s:.1f} s"),
            ("throughput", f"{self.throughput:.2f} jobs/s"),
            (f"polls (every {self.poll_s:g} s)", str(len(self.poll_latencies_s))),
            ("poll latency p50 / p99 / max", ms(self.poll_latencies_s)),
            ("submit latency p50 / p99 / max", ms(self.submit_latencies_s)),
        ]

    def table(self) -> str:
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in self.rows()]
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("poll_latencies_s")
        data.pop("submit_latencies_s")
        data.update(ok=self.ok, throughput_jobs_per_s=self.throughput, table=dict(self.rows()))
        return data


def input_image_uri() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 72), (30, 120, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_load(
    base_url: str,
    api_key: str,
    *,
    submits: int = 200,
    clients: int = 20,
    poll_s: float = 0.5,
    steps: int = 2,
    timeout_s: float = 900.0,
) -> LoadReport:
    """Drive a running server; every client submits its share one job at a time and polls it."""
    report = LoadReport(submits=submits, clients=clients, poll_s=poll_s)
    lock = threading.Lock()
    accepted: list[str] = []
    final: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    image = input_image_uri()
    headers = {"Authorization": f"Bearer {api_key}"}
    shares = [submits // clients + (1 if i < submits % clients else 0) for i in range(clients)]

    def client(index: int, count: int) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
            for n in range(count):
                body = {
                    "prompt": f"load client {index} job {n}",
                    "image": image,
                    "num_inference_steps": steps,
                }
                prediction_id = None
                while prediction_id is None and time.monotonic() < deadline:
                    started = time.perf_counter()
                    try:
                        response = http.post(MODEL_PATH, json=body)
                    except httpx.HTTPError as exc:
                        with lock:
                            report.submit_errors += 1
                            report.errors.append(f"submit: {exc.__class__.__name__}: {exc}")
                        return
                    elapsed = time.perf_counter() - started
                    with lock:
                        report.submit_latencies_s.append(elapsed)
                    if response.status_code == 429:
                        with lock:
                            report.rejected_429 += 1
                        time.sleep(min(float(response.headers.get("retry-after", "1")), 5.0))
                        continue
                    if response.status_code != 200:
                        with lock:
                            report.submit_errors += 1
                            report.errors.append(f"submit: HTTP {response.status_code} {response.text[:200]}")
                        return
                    prediction_id = response.json()["data"]["id"]
                    with lock:
                        accepted.append(prediction_id)
                if prediction_id is None:
                    return
                while time.monotonic() < deadline:
                    time.sleep(poll_s)
                    started = time.perf_counter()
                    try:
                        response = http.get(f"/api/v3/predictions/{prediction_id}/result")
                    except httpx.HTTPError as exc:
                        with lock:
                            report.errors.append(f"poll: {exc.__class__.__name__}: {exc}")
                        continue
                    elapsed = time.perf_counter() - started
                    with lock:
                        report.poll_latencies_s.append(elapsed)
                    if response.status_code != 200:
                        with lock:
                            report.errors.append(f"poll {prediction_id}: HTTP {response.status_code}")
                        continue
                    status = response.json()["data"]["status"]
                    if status in TERMINAL:
                        with lock:
                            final[prediction_id] = status
                        break

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i, n), daemon=True) for i, n in enumerate(shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + REQUEST_TIMEOUT_S)
    report.wall_s = time.monotonic() - started
    report.accepted = len(accepted)

    # Read everything back: each accepted id once more, and the whole history.
    with httpx.Client(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        for prediction_id in accepted:
            if prediction_id not in final:
                response = http.get(f"/api/v3/predictions/{prediction_id}/result")
                status = response.json()["data"]["status"] if response.status_code == 200 else "missing"
                if status in TERMINAL:
                    final[prediction_id] = status
                else:
                    report.lost.append(prediction_id)
        seen: set[str] = set()
        page = 1
        while True:
            data = http.post("/api/v3/predictions", json={"page": page, "page_size": 100}).json()["data"]
            seen.update(item["id"] for item in data["items"])
            if page * 100 >= data["total"]:
                break
            page += 1
    report.history_missing = [i for i in accepted if i not in seen]
    statuses = list(final.values())
    report.completed = statuses.count("completed")
    report.failed = statuses.count("failed")
    report.cancelled = statuses.count("cancelled")
    return report


def run_load_from_args(base_url: str, args: argparse.Namespace) -> LoadReport:
    return run_load(
        base_url,
        args.api_key,
        submits=args.submits,
        clients=args.clients,
        poll_s=args.poll_s,
        steps=args.steps,
        timeout_s=args.timeout_s,
    )


# --- a server of our own ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    data_dir: Path, api_key: str, extra: list[str], *, ready_path: str = "/ready"
) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = data_dir.parent / "server.log"
    command = [
        sys.executable, "-m", "skyreels_local", "serve", "--model", "tiny-random", "--device", "cpu",
        "--port", str(port), "--data-dir", str(data_dir), "--api-key", api_key, "--max-queue", "1000",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREELS_")}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(base_url + ready_path, timeout=2).status_code == 200:
                return process, base_url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit(f"the server was not ready after 300 s; see {log_path}")


# --- a cluster of our own (--cluster) ---------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREELS_")}
    env.update(extra)
    return env


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("--cluster needs redis-server (Debian: apt-get install redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(folder)]  # fmt: skip
    with open(folder / "redis.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"redis-server did not listen on {port}; see {folder / 'redis.log'}")


def start_remote_worker(broker: str, folder: Path, worker_id: str) -> subprocess.Popen:
    """A `skyreels-local worker` with its own working directory and one CPU thread."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "skyreels_local", "worker", "--broker", broker, "--model", "tiny-random",
               "--device", "cpu", "--worker-id", worker_id]  # fmt: skip
    env = clean_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(folder / "worker.log", "ab") as log:
        return subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_consuming(process: subprocess.Popen, log_path: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a worker exited with {process.returncode}; see {log_path}")
        if " ready." in log_path.read_text(errors="replace"):  # Celery's "<id>@<host> ready."
            return
        time.sleep(0.25)
    raise SystemExit(f"a worker did not start consuming in {timeout_s:.0f} s; see {log_path}")


def jobs_run(log_path: Path) -> int:
    """How many predictions a worker completed (its log's `prediction <id>: completed in` lines)."""
    return sum(
        1
        for line in log_path.read_text(errors="replace").splitlines()
        if "remote_worker: prediction " in line and ": completed in " in line
    )


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class ClusterRun:
    workers: int
    report: LoadReport
    jobs_per_worker: list[int]


def run_cluster_once(k: int, args: argparse.Namespace) -> tuple[ClusterRun, Path]:
    work = Path(tempfile.mkdtemp(prefix=f"skyreels-load-cluster{k}-"))
    redis_process = server = None
    workers: list[subprocess.Popen] = []
    try:
        redis_process, broker = start_redis(work / "redis")
        # /health, not /ready: the API is ready only once a remote worker is up.
        server, base_url, _ = start_server(
            work / "data", args.api_key, ["--broker", broker, "--workers", "0"], ready_path="/health"
        )
        folders = [work / f"worker{i}" for i in range(k)]
        workers = [start_remote_worker(broker, folder, f"load-w{i}") for i, folder in enumerate(folders)]
        for process, folder in zip(workers, folders, strict=True):
            wait_consuming(process, folder / "worker.log")
        print(f"cluster K={k}: API {base_url}, {broker}, {k} worker(s); files under {work}", file=sys.stderr)
        report = run_load_from_args(base_url, args)
    finally:
        for process in workers:
            stop(process)
        stop(server)
        stop(redis_process)
    return ClusterRun(k, report, [jobs_run(folder / "worker.log") for folder in folders]), work


def scaling_table(runs: list[ClusterRun]) -> str:
    base = runs[0].report.throughput or math.nan
    lines = [
        "| workers K | completed / accepted | lost | wall s | throughput jobs/s | x first K | poll p99 ms | jobs per worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r = run.report
        lines.append(
            f"| {run.workers} | {r.completed} / {r.accepted} | {len(r.lost) + len(r.history_missing)} "
            f"| {r.wall_s:.1f} | {r.throughput:.2f} | {r.throughput / base:.2f} "
            f"| {percentile(r.poll_latencies_s, 99) * 1000:.1f} | {' + '.join(map(str, run.jobs_per_worker))} |"
        )
    return "\n".join(lines)


def main_cluster(args: argparse.Namespace) -> int:
    ks = [int(k) for k in args.cluster.split(",") if k.strip()]
    if not ks or min(ks) < 1:
        raise SystemExit(f"--cluster takes worker counts >= 1 separated by commas, got {args.cluster!r}")
    runs: list[ClusterRun] = []
    for k in ks:
        run, work = run_cluster_once(k, args)
        runs.append(run)
        print(f"\n### K = {k} workers\n\n{run.report.table()}")
        for error in run.report.errors[:10]:
            print(f"error: {error}", file=sys.stderr)
        if run.report.ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"cluster data and logs kept under {work}", file=sys.stderr)
    print(
        f"\n### Scaling ({os.cpu_count()} CPU cores, tiny model, {args.steps} steps, one thread per worker)\n"
    )
    print(scaling_table(runs))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {"workers": r.workers, "jobs_per_worker": r.jobs_per_worker, **r.report.summary()}
                    for r in runs
                ],
                indent=2,
            )
        )
    return 0 if all(run.report.ok for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--submits", type=int, default=200)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--poll-s", type=float, default=0.5, help="poll interval of each client")
    p.add_argument("--steps", type=int, default=2, help="num_inference_steps of every job")
    p.add_argument("--timeout-s", type=float, default=900.0, help="upper bound of the whole run")
    p.add_argument("--base-url", help="a running server (default: start one with the tiny model)")
    p.add_argument("--api-key", default="load-bench-key")
    p.add_argument("--workers", type=int, default=None, help="worker processes of the started server")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the started server's data and log")
    p.add_argument(
        "--cluster",
        metavar="K1,K2,...",
        help="run against a cluster on this machine (Redis + serve --broker + K workers), once per K",
    )
    args = p.parse_args(argv)
    if args.cluster:
        if args.base_url:
            raise SystemExit("--cluster starts its own cluster: leave out --base-url")
        return main_cluster(args)

    process = work = None
    if args.base_url:
        host = urlsplit(args.base_url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--base-url must be a loopback address, got {host!r}")
        base_url = args.base_url.rstrip("/")
    else:
        work = Path(tempfile.mkdtemp(prefix="skyreels-load-"))
        extra = ["--workers", str(args.workers)] if args.workers is not None else []
        process, base_url, log_path = start_server(work / "data", args.api_key, extra)
        print(f"server {base_url} (tiny-random, cpu), data and log under {work}", file=sys.stderr)
    try:
        report = run_load_from_args(base_url, args)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    print(report.table())
    for error in report.errors[:10]:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report.summary(), indent=2))
    if work is not None:
        if report.ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"server data and log kept under {work}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
