"""Benchmark the web UI serving many listeners: N clients asking /generate at the same moment.

Starts `python app.py` on 127.0.0.1 twice, as a user would, and drives it with real gradio_client
clients (one each, on threads released together by a barrier):
  one_at_a_time  --concurrency 1: requests wait in Gradio's queue and are sampled in turn
                 (the server before batching; issue 12 measured 7, 13, 20, ... 51 s for eight);
  batched        --concurrency N: requests that arrive together are sampled as one batch
                 (sashimi/batching.py), each with its own seed, temperature, top-p and length.
For each: the time of one lone request (median over repeats, after a warm-up), then the time until
each of N simultaneous one-clip requests is answered (every round), whether every answer is a clip
of the length asked, and the server's resident memory after the warm-up and after each round. The ratio
`slowest_over_lone` is the figure of merit (target: <= 2 for eight clients). Every request is
answered end to end: sampling, the likelihood ranking, the pictures, the WAV download.
Prints one JSON object; progress goes to stderr.

    python benchmarks/bench_serving.py                              # checkpoints/fsdd, 8 x 0.5 s
    python benchmarks/bench_serving.py --clients 4 --seconds 0.25 --rounds 1
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import soundfile as sf
import torch
from gradio_client import Client

REPO = Path(__file__).resolve().parent.parent
ISSUE_12_SECONDS = [7, 13, 20, 26, 32, 39, 45, 51]  # eight 0.5 s requests before batching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """`python app.py` on a free local port, until close()."""

    def __init__(self, checkpoint: str, concurrency: int, device: str, log: Path):
        self.port = free_port()
        command = [
            sys.executable,
            str(REPO / "app.py"),
            "--port",
            str(self.port),
            "--device",
            device,
            "--checkpoint",
            checkpoint,
            "--concurrency",
            str(concurrency),
        ]
        self.log = log.open("w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"app.py did not start; see {log}") from None
                time.sleep(0.5)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def ask(client: Client, checkpoint: str, seconds: float, index: int, rate: int) -> float:
    """One request of one clip, each client with its own seed, temperature and top-p; returns
    the seconds until it was answered, after checking the clip has the length asked."""
    started = time.perf_counter()
    files, *_ = client.predict(
        checkpoint,
        1,
        seconds,
        1.0 - 0.02 * index,  # temperature
        1.0 - 0.01 * index,  # top-p
        index,  # seed
        False,
        api_name="/generate",
    )
    elapsed = time.perf_counter() - started
    frames = sf.info(files[0]).frames
    if len(files) != 1 or frames != round(seconds * rate):
        raise RuntimeError(f"request {index} got {len(files)} files of {frames} samples")
    return elapsed


def measure(server: Server, args: argparse.Namespace, rate: int) -> dict:
    clients = [Client(server.url, verbose=False) for _ in range(args.clients)]
    ask(clients[0], args.checkpoint, args.seconds, 0, rate)  # loads the model, warms the caches
    lone = [ask(clients[0], args.checkpoint, args.seconds, 0, rate) for _ in range(args.repeats)]
    rss = [rss_mib(server.process.pid)]
    rounds = []
    for round_index in range(args.rounds):
        barrier = threading.Barrier(args.clients)
        times: list[float | None] = [None] * args.clients

        def one(i: int, barrier: threading.Barrier = barrier, times: list = times) -> None:
            barrier.wait()
            times[i] = ask(clients[i], args.checkpoint, args.seconds, i, rate)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if None in times:
            raise RuntimeError(f"round {round_index}: {times.count(None)} requests unanswered")
        rounds.append(sorted(round(t, 2) for t in times))
        rss.append(rss_mib(server.process.pid))
        print(f"  round {round_index}: {rounds[-1]}, server RSS {rss[-1]} MiB", file=sys.stderr)
    lone_s = statistics.median(lone)
    slowest = statistics.median(max(r) for r in rounds)
    return {
        "lone_s": round(lone_s, 2),
        "simultaneous_s": rounds,  # each round's answer times, sorted
        "slowest_s": round(slowest, 2),  # median over rounds of the last answer
        "slowest_over_lone": round(slowest / lone_s, 2),
        "answered": sum(len(r) for r in rounds),
        "asked": args.clients * args.rounds,
        "server_rss_mib": rss,  # after the warm-up, then after each round
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", default="checkpoints/fsdd", help="as the picker names it")
    parser.add_argument("--clients", type=int, default=8, help="simultaneous requests")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of each clip")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of simultaneous requests")
    parser.add_argument("--repeats", type=int, default=3, help="lone requests timed")
    parser.add_argument("--device", default="cpu", help="the server's --device")
    args = parser.parse_args(argv)
    rate = json.loads((REPO / args.checkpoint / "config.json").read_text())["sample_rate"]

    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as folder:
        for mode, concurrency in (("one_at_a_time", 1), ("batched", args.clients)):
            print(f"{mode}: app.py --concurrency {concurrency}", file=sys.stderr)
            server = Server(args.checkpoint, concurrency, args.device, Path(folder) / "app.log")
            try:
                results[mode] = measure(server, args, rate)
            finally:
                server.close()
    print(
        json.dumps(
            {
                "what": f"{args.clients} simultaneous /generate requests of one {args.seconds:g} s "
                f"clip through app.py, against one lone request",
                "checkpoint": args.checkpoint,
                "device": args.device,
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "load_average": {"before": load_before, "after": os.getloadavg()},
                "issue_12_before_batching_s": ISSUE_12_SECONDS,
                **results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
