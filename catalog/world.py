"""The embedded default dataset: build the synthetic detection world into the catalog.

:func:`build_world` renders train/val/test splits with :mod:`catalog.synthetic`, stores
them as Parquet through :meth:`catalog.Catalog.writer` (all-or-nothing), and records the
generation parameters in ``manifest.info`` so that a second call with the same parameters
returns the stored manifest instead of regenerating (the demo runs twice and reuses it).

The manifest lists the 20 shape classes as categories 1..20 (:data:`CATEGORIES`) and three
fixed base/novel class splits (:data:`CLASS_SPLITS`, 15 base / 5 novel each, like the
PASCAL VOC few-shot splits; the three novel sets are disjoint).
"""
from __future__ import annotations

import os
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from typing import Iterator

from catalog.schema import IMAGE_SCHEMA, Category, ClassSplit, DatasetManifest, SplitOrigin
from catalog.shapes import CLASS_NAMES
from catalog.store import Catalog
from catalog.synthetic import WorldConfig, generate_row

__all__ = [
    "WORLD_NAME", "WORLD_VERSION", "CATEGORIES", "NOVEL_SPLITS", "CLASS_SPLITS",
    "DEFAULT_SIZES", "ID_OFFSETS", "world_manifest", "generation_params", "iter_split",
    "build_world",
]

WORLD_NAME = "synthworld"
# Bump when the generator changes in a way that changes pixels, so stored worlds regenerate.
WORLD_VERSION = 1

CATEGORIES: tuple[Category, ...] = tuple(
    Category(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(CLASS_NAMES)
)

# Novel classes of the three fixed few-shot splits (disjoint; each mixes curved, polygonal
# and letter-like shapes so that every split has base classes of each family to transfer from).
NOVEL_SPLITS: dict[str, tuple[str, ...]] = {
    "split1": ("triangle", "star4", "crescent", "lshape", "gear"),
    "split2": ("circle", "star5", "arrow", "tshape", "hourglass"),
    "split3": ("square", "hexagon", "ring", "heart", "ushape"),
}
CLASS_SPLITS: tuple[ClassSplit, ...] = tuple(
    ClassSplit(
        name=name,
        base=tuple(c for c in CLASS_NAMES if c not in novel),
        novel=tuple(c for c in CLASS_NAMES if c in novel),
    )
    for name, novel in NOVEL_SPLITS.items()
)

DEFAULT_SIZES = {"train": 2000, "val": 300, "test": 300}
# image_id = offset + index + 1, so ids are unique across the splits of one dataset
ID_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}


def generation_params(*, n_train: int, n_val: int, n_test: int, image_size: int,
                      seed: int, config: WorldConfig | None = None) -> dict:
    """What ``manifest.info`` records; equal params mean equal bytes."""
    config = _sized(config, image_size)
    return {
        "generator": "catalog.synthetic",
        "version": WORLD_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "sizes": {"train": int(n_train), "val": int(n_val), "test": int(n_test)},
        "config": config.to_dict(),
    }


def _sized(config: WorldConfig | None, image_size: int) -> WorldConfig:
    if config is None:
        return WorldConfig.square(image_size)
    return replace(config, width=int(image_size), height=int(image_size))


def world_manifest(name: str = WORLD_NAME, info: dict | None = None) -> DatasetManifest:
    """The manifest (categories and class splits) of a synthetic world; splits filled on write."""
    return DatasetManifest(
        name=name,
        categories=list(CATEGORIES),
        class_splits=list(CLASS_SPLITS),
        source="synthetic",
        info=dict(info or {}),
        # the world renders its own train/val/test: nothing is held out at import
        split_origins={s: SplitOrigin(kind="generated", source="catalog.synthetic")
                       for s in ("train", "val", "test")},
    )


def _row(args: tuple) -> dict:
    seed, split, index, config = args
    return generate_row(seed, split, index, config, image_id=ID_OFFSETS[split] + index + 1)


def iter_split(split: str, n: int, *, image_size: int = 160, seed: int = 0,
               config: WorldConfig | None = None, executor: Executor | None = None
               ) -> Iterator[dict]:
    """Catalog rows of one split, in index order (rendered by ``executor`` if given)."""
    config = _sized(config, image_size)
    jobs = ((seed, split, i, config) for i in range(n))
    if executor is None:
        yield from map(_row, jobs)
    else:
        yield from executor.map(_row, jobs, chunksize=32)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, asked {b!r}")
    return out


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def build_world(
    catalog: Catalog,
    name: str = WORLD_NAME,
    *,
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    image_size: int = 160,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    config: WorldConfig | None = None,
) -> DatasetManifest:
    """Generate the synthetic world into ``catalog`` as dataset ``name``; return its manifest.

    If ``name`` already holds a world generated with the same parameters it is reused as is.
    If it holds something else, ``FileExistsError`` is raised unless ``overwrite`` is set,
    in which case it is regenerated (atomically: readers never see a half-written dataset).
    ``workers`` processes render in parallel (default: the CPUs available, at most 8).
    ``config`` changes how scenes look (objects per image, textures, clutter...); its
    width and height are replaced by ``image_size``.
    """
    for label, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{label} must be >= 0, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px, got {image_size}")
    params = generation_params(n_train=n_train, n_val=n_val, n_test=n_test,
                               image_size=image_size, seed=seed, config=config)
    if catalog.has_dataset(name) and not overwrite:
        existing = catalog.manifest(name)
        if existing.info == params:
            return existing
        changes = "; ".join(_diff(existing.info, params)[:6])
        raise FileExistsError(
            f"dataset {name!r} already exists at {catalog.dataset_dir(name)} with other "
            f"generation parameters ({changes}); pass overwrite=True to regenerate it, "
            "or choose another name"
        )

    workers = _default_workers() if workers is None else int(workers)
    manifest = world_manifest(name, params)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    bar = None
    if progress:
        from catalog.progress import progress_bar

        bar = progress_bar(sum(sizes.values()), f"building {name}", "img")
    executor = None
    if workers > 1 and sum(sizes.values()) >= 200:
        # spawn, not fork: the caller may hold threads (torch, Ray) that fork copies broken
        executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        with catalog.writer(manifest, overwrite=True) as writer:
            for split, n in sizes.items():
                if bar is not None:
                    bar.set_postfix_str(split, refresh=False)
                if n == 0:  # still write the (empty) split so every split can be read
                    writer.write_table(split, IMAGE_SCHEMA.empty_table())
                for row in iter_split(split, n, image_size=image_size, seed=seed,
                                      config=config, executor=executor):
                    writer.write_row(split, row)
                    if bar is not None:
                        bar.update(1)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return catalog.manifest(name)
