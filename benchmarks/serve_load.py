"""Load on the Serve endpoint: N concurrent clients for D seconds, per configuration.

    PYTHONPATH=platform:. python benchmarks/serve_load.py --duration 60 --clients 16

Configurations: serve.batch on (max_batch_size 8) / off (max_batch_size 1), each with CLIP
refinement on / off (``?refine=``). Prints requests, errors, p50/p95/p99 latency (ms) and
throughput (requests/s) per configuration. Starts and stops its own MLflow server, Ray and
Serve (one replica, 1 CPU). Not a test: the figures depend on the machine.

By default the version is an untrained cpu-small detector on synthetic blobs (it returns its
cap of boxes per image, the worst case for refinement); ``--checkpoint`` serves a trained
detector on the embedded world's test images instead, and the table says how many boxes an
answer carries. ``--direct-ingress`` sends the clients to the replica's own port
(``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, see ``serve_latency.py``) instead of the proxy.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import requests

from pathlib import Path

from _stack import bench_images, replica_url, serving_stack


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds per configuration")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (threads, one request at a time each)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of traffic before measuring")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="serve this trained detector checkpoint on the world's test images "
                        "(default: an untrained cpu-small detector on synthetic blobs)")
    p.add_argument("--fusion-weight", type=float, default=0.5, help="the refiner's lambda")
    p.add_argument("--direct-ingress", action="store_true",
                   help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the clients call the replica's own port")
    return p


def load(url: str, clients: int, duration: float, warmup: float, refine: bool, images: list[bytes]) -> dict:
    lat: list[float] = []
    boxes: list[int] = []
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
                n = len(r.json()["detections"]) if ok else 0
            except requests.RequestException:
                ok = False
            dt = (time.perf_counter() - t0) * 1000.0
            k += 1
            if measuring.is_set():
                with lock:
                    if ok:
                        lat.append(dt)
                        boxes.append(n)
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
            "rps": len(lat) / elapsed, "boxes": float(np.mean(boxes)) if boxes else float("nan")}


def main(args) -> None:
    if args.direct_ingress:  # read when Ray and Serve start; the replicas inherit it
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    import ray
    import torch

    rows = []
    images = bench_images(8, args.checkpoint)
    with serving_stack(checkpoint=args.checkpoint, fusion_weight=args.fusion_weight) as (proxy_url, _, deploy):
        for batching in (True, False):
            deploy({"max_batch_size": 8 if batching else 1, "batch_wait_timeout_s": 0.01 if batching else 0.0})
            url = replica_url(proxy_url, args.direct_ingress)
            for refine in (False, True):
                r = load(url, args.clients, args.duration, args.warmup, refine, images)
                rows.append({"batching": "on" if batching else "off", "refine": "on" if refine else "off", **r})
                print(rows[-1], flush=True)
    model = args.checkpoint or "untrained cpu-small detector, synthetic blobs"
    print(f"\nserve_load: {args.clients} clients x {args.duration:g} s per row; {model}; fusion weight "
          f"{args.fusion_weight}; {'direct ingress' if args.direct_ingress else 'through the proxy'}; "
          f"1 replica (1 CPU), torch {torch.__version__}, ray {ray.__version__}")
    print(f"{'batching':>8} {'refine':>6} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'req/s':>7} {'boxes/answer':>12}")
    for r in rows:
        print(f"{r['batching']:>8} {r['refine']:>6} {r['requests']:>8} {r['errors']:>6} {r['p50']:>8.1f} "
              f"{r['p95']:>8.1f} {r['p99']:>8.1f} {r['rps']:>7.1f} {r['boxes']:>12.1f}")
    for b in ("on", "off"):
        off = next(r for r in rows if r["batching"] == b and r["refine"] == "off")
        on = next(r for r in rows if r["batching"] == b and r["refine"] == "on")
        print(f"refinement adds {100 * (on['p50'] / off['p50'] - 1):+.0f}% to p50 (batching {b}; goal <= +25%)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
