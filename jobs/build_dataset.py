"""Build the embedded synthetic detection world into the catalog.

    python jobs/build_dataset.py --catalog /data/catalog --n-train 2000
    ray job submit --working-dir . -- python jobs/build_dataset.py

Reuses the dataset when it already exists with the same generation parameters.
"""
from __future__ import annotations

import argparse
import sys



def build_parser() -> argparse.ArgumentParser:
    from catalog.store import DEFAULT_ROOT_ENV, default_root
    from catalog.world import DEFAULT_SIZES, WORLD_NAME

    p = argparse.ArgumentParser(
        prog="build_dataset",
        description="Generate the synthetic few-shot detection world (20 shape classes, "
                    "3 base/novel splits) into the catalog as Parquet. If the dataset "
                    "exists with the same parameters it is reused, not regenerated.",
    )
    p.add_argument("--catalog", default=str(default_root()),
                   help=f"catalog root folder (default: ${DEFAULT_ROOT_ENV} or "
                        f"~/.cache/fewshot/catalog; now {default_root()})")
    p.add_argument("--name", default=WORLD_NAME,
                   help=f"dataset name in the catalog (default: {WORLD_NAME})")
    p.add_argument("--n-train", type=int, default=DEFAULT_SIZES["train"],
                   help=f"number of training images (default: {DEFAULT_SIZES['train']})")
    p.add_argument("--n-val", type=int, default=DEFAULT_SIZES["val"],
                   help=f"number of validation images (default: {DEFAULT_SIZES['val']})")
    p.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"],
                   help=f"number of test images (default: {DEFAULT_SIZES['test']})")
    p.add_argument("--image-size", type=int, default=160,
                   help="side of the square RGB images in pixels; object sizes scale with "
                        "it (default: 160)")
    p.add_argument("--seed", type=int, default=0,
                   help="generation seed; the same seed gives the same bytes (default: 0)")
    p.add_argument("--preset", default="default", choices=["default", "easy"],
                   help="how hard the scenes are: 'default' has every nuisance (textures, "
                        "clutter, busy backgrounds, 10-80 px objects); 'easy' has solid or "
                        "gradient objects of 16-80 px on plain gradients, no clutter "
                        "(default: default)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes rendering in parallel (default: CPUs available, max 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate and replace the dataset even if it already exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from catalog.store import Catalog
    from catalog.synthetic import WorldConfig
    from catalog.world import build_world

    catalog = Catalog(args.catalog)
    try:
        manifest = build_world(
            catalog, args.name, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
            image_size=args.image_size, seed=args.seed, overwrite=args.overwrite,
            progress=not args.no_progress, workers=args.workers,
            config=WorldConfig.preset(args.preset, args.image_size),
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s}={n}" for s, n in manifest.splits.items())
    print(f"dataset {manifest.name!r} at {catalog.dataset_dir(manifest.name)}")
    print(f"images: {counts}; classes: {len(manifest.categories)}; "
          f"class splits: {', '.join(cs.name for cs in manifest.class_splits)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
