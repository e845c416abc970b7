"""Make the repository's packages importable when a job runs as a plain script.

``python jobs/x.py`` (or ``ray job submit --working-dir . -- python jobs/x.py``) puts only
``jobs/`` on sys.path; the library lives in ``platform/`` (``fewshot``) and at the top
(``catalog``, ``serving``). An installed copy (``pip install -e .``) works the same way.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "platform"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
