"""Command-line flags the episode benchmarks share (a parent checkpoint and the embedded world's
catalog), so each script adds only its own."""
from __future__ import annotations

import argparse
import os
import tempfile


def episode_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first paragraph, with --checkpoint and --catalog."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the parent: a base detector.pt over split1's base classes")
    p.add_argument("--catalog", default=os.path.join(tempfile.gettempdir(), "fewshot-quality-catalog"),
                   help="catalog holding the embedded world (default: where base_detector_budget.py builds it)")
    return p
