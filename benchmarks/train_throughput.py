"""Training throughput (images/s) of the same model and batch: (a) the plain loop in one process,
(b) Ray Train with 1 worker, (c) Ray Train with 2 workers. Goal: (b) >= 0.95 x (a).

    python benchmarks/train_throughput.py                      # cpu-small on the CPU
    python benchmarks/train_throughput.py --device cuda        # + r50-fpn in bf16 and fp32 on a GPU
    python benchmarks/train_throughput.py --only plain         # torch only (no ray needed)

Each configuration runs ``--warmup`` steps, then ``--repeats`` timed windows of ``--steps``
steps; the table shows the median images/s over the windows (and min-max). Batches are synthetic
(uint8 images with a few boxes, made once) so the figure is the step, not the data pipeline; the
Ray Train figures are timed inside the worker, after the warm-up (start-up is printed apart).
With --profile, worker 0 of the 1-worker run writes a cProfile of its timed steps.
"""
from __future__ import annotations

import argparse
import platform as _platform
import statistics
import sys
import time

import torch

try:  # the torch-only part runs without ray
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
except ImportError:  # pragma: no cover - a torch-only box
    ray = None

from fewshot.learning.loop import TrainConfig, make_optimizer, train
from fewshot.model.detector import build_detector
from fewshot.model.devices import resolve_precision
from fewshot.model.presets import preset


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds r50-fpn at bf16 and fp32)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step per worker")
    p.add_argument("--steps", type=int, default=4, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop and of 1 worker")
    p.add_argument("--only", choices=["plain", "ray1", "ray2"], action="append",
                   help="run only these (repeatable)")
    p.add_argument("--profile", default=None, help="cProfile output of the 1-worker Ray run (worker 0)")
    return p


def synthetic_batch(config, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = config.max_size if config.preset != "cpu-small" else 256
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(3, 2, generator=g) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 16, (3,), generator=g)})
    return images, targets


def timed_windows(model, device, precision, args, on_window=None) -> list[float]:
    """Run warm-up then ``repeats`` windows of ``steps`` steps; images/s of each window."""
    images, targets = synthetic_batch(CONFIG, args.batch_size)
    cfg = TrainConfig(steps=args.repeats * args.steps, batch_size=args.batch_size, lr=1e-4, warmup_steps=1,
                      log_every=args.steps)
    optimizer = make_optimizer(model, cfg)
    marks: list[float] = []
    sync = (lambda: torch.cuda.synchronize()) if torch.device(device).type == "cuda" else (lambda: None)

    def on_log(step, metrics):  # log_every == steps: syncs once per window, like a real run
        sync()
        marks.append(time.perf_counter())

    class Batches:
        def __next__(self):
            return images, targets

    warm = TrainConfig(steps=args.warmup, batch_size=args.batch_size, lr=1e-4, warmup_steps=1,
                       log_every=args.warmup)
    if args.warmup:
        train(model, Batches(), warm, progress=False, device=device, precision=precision, optimizer=optimizer)
    sync()
    t0 = time.perf_counter()
    marks.clear()
    train(model, Batches(), cfg, on_log=on_log, progress=False, device=device, precision=precision,
          optimizer=optimizer)
    edges = [t0] + marks
    return [args.steps * args.batch_size / (b - a) for a, b in zip(edges, edges[1:])][: args.repeats]


CONFIG = preset("cpu-small")


def run_plain(args, precision) -> list[float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_detector(CONFIG, 16)
    return timed_windows(model, args.device, precision, args)


def _worker(config: dict) -> None:
    args, precision = config["args"], config["precision"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(build_detector(CONFIG, 16).to(device),
                                          parallel_strategy_kwargs={"find_unused_parameters": True})
    profiler = None
    if config.get("profile") and ray.train.get_context().get_world_rank() == 0:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    rates = timed_windows(model, device, precision, args)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(config["profile"])
    # Ray Train keeps the metrics of reports that carry a checkpoint: rank 0 attaches its rates
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            with open(f"{d}/rates.json", "w") as f:
                json.dump(rates, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"median": statistics.median(rates)}, checkpoint=checkpoint)


def run_ray(args, precision, workers: int) -> tuple[list[float], float]:
    gpu = torch.device(args.device).type == "cuda"
    threads = args.threads if workers == 1 else max(1, args.threads // workers)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"args": args, "precision": precision, "threads": threads,
                           "profile": args.profile if workers == 1 else None},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": threads, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name=f"throughput-{workers}w", storage_path="/tmp/fewshot-bench-ray"),
    )
    result = trainer.fit()
    wall = time.perf_counter() - t0
    # rank 0's windows; every worker steps the same batch size in lock-step (DDP), so x workers
    import json

    with result.checkpoint.as_directory() as d:
        rates = json.load(open(f"{d}/rates.json"))
    return [r * workers for r in rates], wall


def main(args) -> int:
    global CONFIG
    runs = args.only or ["plain", "ray1", "ray2"]
    if ray is None and runs != ["plain"]:
        print("ray is not installed: running the plain loop only", file=sys.stderr)
        runs = ["plain"]
    setups = [("cpu-small", resolve_precision("auto", "cpu"))]
    if torch.device(args.device).type == "cuda":
        setups = [("cpu-small", "fp32"), ("r50-fpn", "bf16"), ("r50-fpn", "fp32")]
    if ray is not None and any(r.startswith("ray") for r in runs):
        ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    rows = []
    for preset_name, precision in setups:
        CONFIG = preset(preset_name)
        plain = None
        for run in runs:
            if run == "plain":
                rates, wall = run_plain(args, precision), float("nan")
            else:
                rates, wall = run_ray(args, precision, 1 if run == "ray1" else 2)
            med = statistics.median(rates)
            plain = med if run == "plain" else plain
            rows.append((preset_name, precision, run, med, min(rates), max(rates), len(rates),
                         med / plain if plain else float("nan"), wall))
            print(f"{preset_name} {precision} {run}: {med:.2f} img/s (windows {[round(r, 2) for r in rates]})",
                  flush=True)
    device = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else \
        f"CPU ({_platform.processor() or _platform.machine()}, {torch.get_num_threads()} threads max)"
    print(f"\ndevice: {device}; torch {torch.__version__}; ray {ray.__version__ if ray else 'not installed'}; "
          f"batch {args.batch_size} images/worker; {args.repeats} windows x {args.steps} steps "
          f"after {args.warmup} warm-up steps; plain/1 worker: {args.threads} threads, 2 workers: "
          f"{max(1, args.threads // 2)} each\n")
    print("| preset | precision | run | images/s (median) | min-max | windows | vs plain | fit wall s |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"plain": "(a) plain loop", "ray1": "(b) Ray Train, 1 worker", "ray2": "(c) Ray Train, 2 workers"}
    for p, prec, run, med, lo, hi, n, rel, wall in rows:
        print(f"| {p} | {prec} | {names[run]} | {med:.2f} | {lo:.2f}-{hi:.2f} | {n} | {rel:.2f} | "
              f"{'' if wall != wall else f'{wall:.1f}'} |")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
