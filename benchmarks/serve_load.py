"""Load on the Serve endpoint: N concurrent clients for D seconds, per configuration.

    PYTHONPATH=platform:. python benchmarks/serve_load.py --duration 60 --clients 16

Configurations: serve.batch on (max_batch_size 8) / off (max_batch_size 1), each with CLIP
refinement on / off (``?refine=``). Prints requests, errors, p50/p95/p99 latency (ms) and
throughput (requests/s) per configuration. Starts and stops its own MLflow server, Ray and
Serve (one replica, 1 CPU). Not a test: the figures depend on the machine.
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import requests

from _stack import serving_stack, test_image


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds per configuration")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of traffic before measuring")
    return p


def load(url: str, clients: int, duration: float, warmup: float, refine: bool) -> dict:
    images = [test_image(s) for s in range(8)]
    lat: list[float] = []
    errors = [0]
    stop = threading.Event()
    measuring = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        session = requests.Session()
        k = i
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/detect", params={"refine": str(refine).lower()},
                                 data=images[k % len(images)], timeout=60)
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            dt = (time.perf_counter() - t0) * 1000.0
            k += 1
            if measuring.is_set():
                with lock:
                    if ok:
                        lat.append(dt)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    measuring.set()
    t0 = time.perf_counter()
    time.sleep(duration)
    measuring.clear()
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(timeout=60)
    a = np.asarray(lat) if lat else np.asarray([np.nan])
    return {"requests": len(lat), "errors": errors[0], "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)),
            "rps": len(lat) / elapsed}


def main(args) -> None:
    import ray
    import torch

    rows = []
    with serving_stack() as (url, _, deploy):
        for batching in (True, False):
            deploy({"max_batch_size": 8 if batching else 1, "batch_wait_timeout_s": 0.01 if batching else 0.0})
            for refine in (False, True):
                r = load(url, args.clients, args.duration, args.warmup, refine)
                rows.append({"batching": "on" if batching else "off", "refine": "on" if refine else "off", **r})
                print(rows[-1], flush=True)
    print(f"\nserve_load: {args.clients} clients x {args.duration:g} s per row; cpu-small detector, "
          f"1 replica (1 CPU), torch {torch.__version__}, ray {ray.__version__}")
    print(f"{'batching':>8} {'refine':>6} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'req/s':>7}")
    for r in rows:
        print(f"{r['batching']:>8} {r['refine']:>6} {r['requests']:>8} {r['errors']:>6} {r['p50']:>8.1f} "
              f"{r['p95']:>8.1f} {r['p99']:>8.1f} {r['rps']:>7.1f}")
    for b in ("on", "off"):
        off = next(r for r in rows if r["batching"] == b and r["refine"] == "off")
        on = next(r for r in rows if r["batching"] == b and r["refine"] == "on")
        print(f"refinement adds {100 * (on['p50'] / off['p50'] - 1):+.0f}% to p50 (batching {b}; goal <= +25%)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
