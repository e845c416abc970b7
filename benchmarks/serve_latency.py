"""Raw ``Detector.predict`` against the HTTP endpoint, the same model and image.

    PYTHONPATH=platform:. python benchmarks/serve_latency.py --repeats 5 --seconds 5

- latency at concurrency 1: raw predict on one image vs ``POST /v1/detect`` (p50, p95), and
  where the difference goes: the replica's own work in this process (decode the upload +
  ``Answerer.answer``, no Ray), the endpoint with serve.batch off (no batch wait), and Ray
  Serve's floor on this machine (an echo deployment answering the same upload through the same
  proxy, no model);
- latency and throughput at concurrency 1 / 4 / 16 with serve.batch on (max_batch_size 8,
  waiting 5 ms or not at all for a batch to fill) and off (1), against raw batched throughput (``Detector.predict`` on batches of 8, one thread, as the
  1-CPU replica runs).

Each figure is the median of ``--repeats`` runs. Refinement off (the detector alone), so the
figures compare the serving overhead. Prints device, precision and versions.

``--direct-ingress`` starts Ray with ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (experimental in
Ray 2.60): every ingress replica then also serves HTTP on a port of its own (30000-31000), so
a load balancer can reach it without the proxy hop. The HTTP rows then go to the replica's
port (the echo floor too, to its own replica's port), and one row still goes through the
proxy for comparison.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import threading
import time

import numpy as np
import requests

from _stack import detector_and_refiner, listening, replica_url, serving_stack, test_image


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="runs per figure (the median is printed)")
    p.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    p.add_argument("--iters", type=int, default=30, help="requests per latency run")
    p.add_argument("--direct-ingress", action="store_true",
                   help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: send the HTTP rows to the replica's own port")
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


def replica_path_latency(answerer, data, iters):
    """What the replica does for one request, minus Ray and HTTP: decode the upload, answer."""
    from fewshot.clip.answering import Item
    from serving.images import decode_upload

    def once():
        decoded = decode_upload(data, 10 << 20, 12_000_000, answerer.model_size)
        return answerer.answer([Item(decoded, 0.3, False)])

    once()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        once()
        ts.append((time.perf_counter() - t0) * 1000)
    return pct(ts, 50), pct(ts, 95)


# (label, max_batch_size, batch_wait_timeout_s): wait 0 takes whatever queued while the previous
# batch ran (no added wait at concurrency 1, still batches under load)
BATCH_CONFIGS = [("on (8, wait 5 ms)", 8, 0.005), ("on (8, wait 0)", 8, 0.0), ("off (1)", 1, 0.0)]


class Echo:
    """Ray Serve's floor: read the upload, answer a small JSON; no model."""

    async def __call__(self, request):
        body = await request.body()
        return {"bytes": len(body)}


def http_latency(url, data, iters, path="/v1/detect?refine=false"):
    s = requests.Session()
    s.post(f"{url}{path}", data=data, timeout=60)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        r = s.post(f"{url}{path}", data=data, timeout=60)
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
    if args.direct_ingress:  # read when Ray and Serve start; the replicas inherit it
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    import ray
    import torch
    from PIL import Image
    from ray import serve

    data = test_image(0)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    med = statistics.median
    with serving_stack({"max_batch_size": 8, "batch_wait_timeout_s": 0.005}) as (proxy_url, path, deploy):
        url, via_proxy = replica_url(proxy_url, args.direct_ingress), None
        if args.direct_ingress:
            via_proxy = [http_latency(proxy_url, data, args.iters) for _ in range(args.repeats)]
        torch.set_num_threads(1)  # as the 1-CPU replica (Ray sets OMP_NUM_THREADS=1)
        det, answerer = detector_and_refiner(path)
        raw = [raw_latency(det, image, args.iters) for _ in range(args.repeats)]
        replica = [replica_path_latency(answerer, data, args.iters) for _ in range(args.repeats)]
        raw_tp = med([raw_batched_throughput(det, image, args.seconds) for _ in range(args.repeats)])
        del det, answerer
        before = listening() if args.direct_ingress else set()
        serve.run(serve.deployment(Echo, ray_actor_options={"num_cpus": 0}).bind(), name="echo",
                  route_prefix="/echo")
        echo_url = url
        if args.direct_ingress:
            new = listening() - before
            if len(new) != 1:
                raise RuntimeError(f"expected the echo replica's port, found {sorted(new)}")
            echo_url = f"http://127.0.0.1:{new.pop()}"
        echo = [http_latency(echo_url, data, args.iters, path="/echo") for _ in range(args.repeats)]
        serve.delete("echo")
        tput, http_cfg = {}, {}
        for name, size, wait in BATCH_CONFIGS:
            deploy({"max_batch_size": size, "batch_wait_timeout_s": wait})
            url = replica_url(proxy_url, args.direct_ingress)
            http_cfg[name] = [http_latency(url, data, args.iters) for _ in range(args.repeats)]
            for clients in (1, 4, 16):
                runs = [http_throughput(url, data, clients, args.seconds) for _ in range(args.repeats)]
                tput[(name, clients)] = (med([r for r, _ in runs]), sum(e for _, e in runs))
    print(f"\nserve_latency: device cpu ({platform.processor() or platform.machine()}, shared 2-core "
          f"machine), precision float32, torch {torch.__version__}, ray {ray.__version__}; "
          f"image 160x160 PNG, cpu-small detector, refinement off; median of {args.repeats} repeats; "
          f"HTTP {'to the replica port (direct ingress)' if args.direct_ingress else 'through the Serve proxy'}")
    r50, r95 = med([a for a, _ in raw]), med([b for _, b in raw])
    p50, p95 = med([a for a, _ in replica]), med([b for _, b in replica])
    e50, e95 = med([a for a, _ in echo]), med([b for _, b in echo])
    print(f"\n{'concurrency 1':<44} {'p50 ms':>8} {'p95 ms':>8}")
    print(f"{'raw Detector.predict':<44} {r50:>8.1f} {r95:>8.1f}")
    print(f"{'replica path in-process (decode + answer)':<44} {p50:>8.1f} {p95:>8.1f}")
    http50 = {}
    for name, _, _ in BATCH_CONFIGS:
        h50, h95 = med([a for a, _ in http_cfg[name]]), med([b for _, b in http_cfg[name]])
        http50[name] = h50
        print(f"{'HTTP /v1/detect, serve.batch ' + name:<44} {h50:>8.1f} {h95:>8.1f}")
    print(f"{'HTTP echo deployment (Serve floor, no model)':<44} {e50:>8.1f} {e95:>8.1f}")
    if via_proxy:
        v50, v95 = med([a for a, _ in via_proxy]), med([b for _, b in via_proxy])
        print(f"{'HTTP /v1/detect via the proxy (wait 5 ms)':<44} {v50:>8.1f} {v95:>8.1f}")
    for name, h50 in http50.items():
        print(f"HTTP - raw p50, serve.batch {name}: {h50 - r50:+.1f} ms (goal <= +10 ms)")
    off = http50[BATCH_CONFIGS[-1][0]]
    print(f"  of which (batch off): decode + answer formatting {p50 - r50:+.1f} ms; Serve proxy/HTTP floor "
          f"{e50:.1f} ms; the rest (replica's queue, asyncio/threads, response model) {off - p50 - e50:+.1f} ms")
    print(f"\n{'throughput (req/s)':<32} {'c=1':>7} {'c=4':>7} {'c=16':>7} {'errors':>7}")
    for name, _, _ in BATCH_CONFIGS:
        row = [tput[(name, c)][0] for c in (1, 4, 16)]
        errs = sum(tput[(name, c)][1] for c in (1, 4, 16))
        print(f"{'serve.batch ' + name:<32} {row[0]:>7.1f} {row[1]:>7.1f} {row[2]:>7.1f} {errs:>7}")
    print(f"{'raw predict, batches of 8':<32} {'':>7} {'':>7} {raw_tp:>7.1f}")
    for name, _, _ in BATCH_CONFIGS[:-1]:
        print(f"throughput at 16, serve.batch {name} / raw batched: {tput[(name, 16)][0] / raw_tp:.2f} (goal >= 0.90)")

if __name__ == "__main__":
    main(get_args_parser().parse_args())
