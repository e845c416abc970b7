"""Raw ``Detector.predict`` against the HTTP endpoint, the same model and image.

    PYTHONPATH=platform:. python benchmarks/serve_latency.py --repeats 5 --seconds 5

- latency at concurrency 1: raw predict on one image vs ``POST /v1/detect`` (p50, p95);
- throughput at concurrency 1 / 4 / 16 with serve.batch on (max_batch_size 8) and off (1),
  against raw batched throughput (``Detector.predict`` on batches of 8, one thread, as the
  1-CPU replica runs).

Each figure is the median of ``--repeats`` runs. Refinement off (the detector alone), so the
figures compare the serving overhead. Prints device, precision and versions.
"""
from __future__ import annotations

import argparse
import io
import platform
import statistics
import threading
import time

import numpy as np
import requests

from _stack import detector_and_refiner, serving_stack, test_image


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    p.add_argument("--iters", type=int, default=30, help="requests per latency run")
    return p


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def raw_latency(det, image, iters):
    det.predict([image], 0.3)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        det.predict([image], 0.3)
        ts.append((time.perf_counter() - t0) * 1000)
    return pct(ts, 50), pct(ts, 95)


def raw_batched_throughput(det, image, seconds, batch=8):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        det.predict([image] * batch, 0.3)
        n += batch
    return n / (time.perf_counter() - t0)


def http_latency(url, data, iters):
    s = requests.Session()
    s.post(f"{url}/v1/detect?refine=false", data=data, timeout=60)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        r = s.post(f"{url}/v1/detect?refine=false", data=data, timeout=60)
        assert r.status_code == 200, r.text
        ts.append((time.perf_counter() - t0) * 1000)
    return pct(ts, 50), pct(ts, 95)


def http_throughput(url, data, clients, seconds):
    count, errors, stop = [0], [0], threading.Event()
    lock = threading.Lock()

    def client():
        s = requests.Session()
        while not stop.is_set():
            r = s.post(f"{url}/v1/detect?refine=false", data=data, timeout=60)
            with lock:
                if r.status_code == 200:
                    count[0] += 1
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # ramp up
    c0, t0 = count[0], time.perf_counter()
    time.sleep(seconds)
    rps = (count[0] - c0) / (time.perf_counter() - t0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return rps, errors[0]


def main(args) -> None:
    import ray
    import torch
    from PIL import Image

    data = test_image(0)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    med = statistics.median
    with serving_stack({"max_batch_size": 8, "batch_wait_timeout_s": 0.005}) as (url, path, deploy):
        torch.set_num_threads(1)  # as the 1-CPU replica (Ray sets OMP_NUM_THREADS=1)
        det, _ = detector_and_refiner(path)
        raw = [raw_latency(det, image, args.iters) for _ in range(args.repeats)]
        raw_tp = med([raw_batched_throughput(det, image, args.seconds) for _ in range(args.repeats)])
        del det
        http = [http_latency(url, data, args.iters) for _ in range(args.repeats)]
        tput = {}
        for batching in (True, False):
            deploy({"max_batch_size": 8 if batching else 1,
                    "batch_wait_timeout_s": 0.005 if batching else 0.0})
            for clients in (1, 4, 16):
                runs = [http_throughput(url, data, clients, args.seconds) for _ in range(args.repeats)]
                tput[(batching, clients)] = (med([r for r, _ in runs]), sum(e for _, e in runs))
    print(f"\nserve_latency: device cpu ({platform.processor() or platform.machine()}, shared 2-core "
          f"machine), precision float32, torch {torch.__version__}, ray {ray.__version__}; "
          f"image 160x160 PNG, cpu-small detector, refinement off; median of {args.repeats} repeats")
    r50, r95 = med([a for a, _ in raw]), med([b for _, b in raw])
    h50, h95 = med([a for a, _ in http]), med([b for _, b in http])
    print(f"\n{'concurrency 1':<28} {'p50 ms':>8} {'p95 ms':>8}")
    print(f"{'raw Detector.predict':<28} {r50:>8.1f} {r95:>8.1f}")
    print(f"{'HTTP /v1/detect':<28} {h50:>8.1f} {h95:>8.1f}")
    print(f"HTTP - raw p50: {h50 - r50:+.1f} ms (goal <= +10 ms)")
    print(f"\n{'throughput (req/s)':<28} {'c=1':>7} {'c=4':>7} {'c=16':>7} {'errors':>7}")
    for batching in (True, False):
        row = [tput[(batching, c)][0] for c in (1, 4, 16)]
        errs = sum(tput[(batching, c)][1] for c in (1, 4, 16))
        print(f"{'serve.batch ' + ('on (8)' if batching else 'off'):<28} {row[0]:>7.1f} {row[1]:>7.1f} "
              f"{row[2]:>7.1f} {errs:>7}")
    print(f"{'raw predict, batches of 8':<28} {'':>7} {'':>7} {raw_tp:>7.1f}")
    print(f"throughput at 16 (batch on) / raw batched: {tput[(True, 16)][0] / raw_tp:.2f} (goal >= 0.90)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
