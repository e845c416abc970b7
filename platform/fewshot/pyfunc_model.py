"""Where versions registered before the learning core moved into rooms find their pyfunc class.

Their ``python_model.pkl`` pickles ``fewshot.pyfunc_model.DetectorPyfunc`` by reference, so
this module must keep that name importable (``tests/test_legacy_versions.py`` loads such a
version). New versions pickle :class:`fewshot.backends.pyfunc.DetectorPyfunc`.
"""
from fewshot.backends.pyfunc import DetectorPyfunc

__all__ = ["DetectorPyfunc"]
