"""Load test: nas-dashboard against a crowd, held connections and slow senders, on loopback only.

Starts `python -m nas dashboard` on 127.0.0.1 (a free port) over a temporary storage of
synthetic studies (architectures sampled from the default search space, no training), then:

  crowd  N clients at once, each R requests, a new connection each, to what a browser polls
         (/, /fragments/studies, /api/studies, a study page and its fragment)
  held   H connections opened and left silent and S slow senders writing requests a byte every
         0.2 s (--slow-interval), then the same crowd while they are held; afterwards, how many held
         connections the server closed (it should: they are idle) and how many of the slow
         senders' requests were answered

and prints one table: requests served, p50 / p99 latency, the server's peak memory, threads and
open files. It stops by itself (fixed sizes, a timeout on every socket) and ends the server.

    .venv/bin/python scripts/load_dashboard.py                         # 100 x 20, 500 held, 50 slow
    .venv/bin/python scripts/load_dashboard.py --clients 10 --requests 2 --held 20 --slow 5 --idle-timeout 2
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import psutil

HOST = "127.0.0.1"  # never anything else: this is a load test of our own server
TIMEOUT = 60.0  # seconds a client waits for a connection or an answer


def make_storage(folder: Path, studies: int, trials: int) -> str:
    """`studies` studies of `trials` finished trials each, with sampled ArchSpecs and scores, in a SQLite file."""
    from nas.search import Space, load_space

    url = f"sqlite:///{folder}/load.db"
    space = Space(
        load_space(Path(__file__).resolve().parent.parent / "nas" / "default" / "search_spaces" / "bn_placement.yaml")
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for s in range(studies):
        study = optuna.create_study(storage=url, study_name=f"load-{s}", sampler=optuna.samplers.RandomSampler(seed=s))
        for _ in range(trials):
            trial = study.ask()
            arch = space.sample(trial)
            value = trial.suggest_float("score", 0.05, 2.0)  # stands in for a CV loss
            trial.set_user_attr("arch", arch)
            trial.set_user_attr("cv_accuracy", 1 - value / 2)
            study.tell(trial, value)
    return url


class Server:
    """The dashboard process, and a sampler of its memory, threads and open files."""

    def __init__(self, storage: str, workdir: Path, idle_timeout: int | None):
        extra = ["--idle-timeout", str(idle_timeout)] if idle_timeout is not None else []
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nas",
                "dashboard",
                "--storage",
                storage,
                "--host",
                HOST,
                "--port",
                "0",
                "--workdir",
                str(workdir),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        ready, _, _ = select.select([self.process.stdout], [], [], 120)
        line = self.process.stdout.readline() if ready else ""
        match = re.search(r"http://[^/]+:(\d+)/", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"nas-dashboard did not start: {line!r}")
        self.port = int(match.group(1))
        self.info = psutil.Process(self.process.pid)
        self.peak = {"rss": 0, "threads": 0, "files": 0}
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            try:
                now = {
                    "rss": self.info.memory_info().rss,
                    "threads": self.info.num_threads(),
                    "files": self.info.num_fds(),
                }
            except psutil.Error:
                return
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def reset_peaks(self) -> None:
        self.peak = {"rss": 0, "threads": 0, "files": 0}

    def close(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def crowd(port: int, clients: int, requests: int, paths: list[str]) -> dict:
    """`clients` threads at once, each `requests` GETs on a new connection: statuses and latencies."""
    start, latencies, failures, lock = threading.Barrier(clients), [], {}, threading.Lock()

    def client(i: int) -> None:
        start.wait()
        for r in range(requests):
            began = time.monotonic()
            try:
                conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
                conn.request("GET", paths[(i + r) % len(paths)], headers={"Host": f"{HOST}:{port}"})
                reply = conn.getresponse()
                reply.read()
                conn.close()
                outcome = reply.status
            except OSError as exc:
                outcome = type(exc).__name__
            with lock:
                if outcome == 200:
                    latencies.append(time.monotonic() - began)
                else:
                    failures[outcome] = failures.get(outcome, 0) + 1

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "sent": clients * requests,
        "served": len(latencies),
        "failures": failures,
        "wall": time.monotonic() - began,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }


def study_pages(port: int) -> list[str]:
    """The first study's page and its live fragment, as the list page links them."""
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    conn.request("GET", "/", headers={"Host": f"{HOST}:{port}"})
    link = re.search(r'href="(/studies/[^"]+)"', conn.getresponse().read().decode())
    conn.close()
    return [link.group(1), "/fragments" + link.group(1)] if link else []


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def open_held(port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        try:
            held.append(socket.create_connection((HOST, port), timeout=TIMEOUT))
        except OSError:
            break
    return held


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class SlowSenders:
    """`count` clients that each write their GET a byte every `interval` seconds, read the answer, and start
    again until stopped."""

    def __init__(self, port: int, count: int, interval: float):
        self.port, self.interval, self.answered, self.failed = port, interval, 0, 0
        self.request = f"GET /api/studies HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
        self._stop, self.lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(count)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection((HOST, self.port), timeout=TIMEOUT) as sock:
                    for i in range(len(self.request)):
                        if self._stop.wait(self.interval):
                            return  # the phase ended mid-request: neither answered nor failed
                        sock.send(self.request[i : i + 1])
                    ok = re.match(rb"HTTP/1\.[01] 200 ", sock.recv(64)) is not None
            except OSError:
                ok = False
            with self.lock:
                self.answered += ok
                self.failed += not ok

    def finish(self) -> tuple[int, int]:
        """Stop them; how many of their requests were answered (200) and how many failed."""
        self._stop.set()
        for t in self.threads:
            t.join()
        return self.answered, self.failed


def row(name: str, result: dict, server: Server, extra: str = "") -> str:
    failures = ", ".join(f"{n} {k}" for k, n in sorted(result["failures"].items(), key=str)) or "none"
    return (
        f"| {name} | {result['served']}/{result['sent']} | {failures} | {result['p50'] * 1000:.0f} | "
        f"{result['p99'] * 1000:.0f} | {result['wall']:.1f} | {server.peak['rss'] / 2**20:.0f} | "
        f"{server.peak['threads']} | {server.peak['files']} | {extra} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients (default %(default)s)")
    parser.add_argument("--requests", type=int, default=20, help="requests per client (default %(default)s)")
    parser.add_argument("--held", type=int, default=500, help="silent connections held open (default %(default)s)")
    parser.add_argument("--slow", type=int, default=50, help="slow senders (default %(default)s)")
    parser.add_argument(
        "--slow-interval",
        type=float,
        default=0.2,
        help="seconds between a slow sender's bytes (default %(default)s: a request in about 15 s)",
    )
    parser.add_argument("--studies", type=int, default=3, help="synthetic studies (default %(default)s)")
    parser.add_argument("--trials", type=int, default=60, help="trials per study (default %(default)s)")
    parser.add_argument("--idle-timeout", type=int, help="passed to nas-dashboard (default: its own)")
    args = parser.parse_args()
    if (
        min(args.clients, args.requests) < 1
        or min(args.held, args.slow, args.studies, args.trials) < 0
        or not args.slow_interval > 0
    ):
        parser.error("--clients and --requests must be >= 1, --slow-interval > 0, the others >= 0")

    with tempfile.TemporaryDirectory(prefix="nas-load-") as tmp:
        storage = make_storage(Path(tmp), args.studies, args.trials)
        server = Server(storage, Path(tmp) / "work", args.idle_timeout)
        try:
            paths = ["/", "/fragments/studies", "/api/studies"]
            crowd(server.port, 4, 2, paths)  # warm up: the first page imports the templates
            paths += study_pages(server.port)
            server.reset_peaks()
            print(
                f"nas-dashboard pid {server.process.pid} on {HOST}:{server.port}; "
                f"{args.studies} studies x {args.trials} trials; {os.cpu_count()} CPUs; "
                "every request on a new connection",
                flush=True,
            )
            print(
                "| phase | served | failed | p50 ms | p99 ms | wall s | server RSS peak MiB | threads peak | "
                "open files peak | held connections |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|")
            print(
                row(
                    f"{args.clients} clients x {args.requests}",
                    crowd(server.port, args.clients, args.requests, paths),
                    server,
                    "-",
                ),
                flush=True,
            )
            server.reset_peaks()
            held = open_held(server.port, args.held)
            slow = SlowSenders(server.port, args.slow, args.slow_interval)
            result = crowd(server.port, args.clients, args.requests, paths)
            idle = (
                args.idle_timeout or 30
            ) * 1.5 + 5  # the server looks for idle connections every quarter of the timeout
            waited = time.monotonic()
            while time.monotonic() - waited < idle and not all(closed_by_server(s) for s in held):
                time.sleep(0.5)
            waited, closed = time.monotonic() - waited, sum(closed_by_server(s) for s in held)
            answered, failed = slow.finish()
            for sock in held:
                sock.close()
            print(
                row(
                    f"{args.clients} clients x {args.requests} while held",
                    result,
                    server,
                    f"{len(held)} silent: {closed} closed by the server, {waited:.0f} s after the crowd; "
                    f"{args.slow} slow senders (a byte every {args.slow_interval:g} s): {answered} requests answered, "
                    f"{failed} failed",
                ),
                flush=True,
            )
        finally:
            server.close()


if __name__ == "__main__":
    main()
