"""The catalog: datasets and class sets for the few-shot detection platform."""
from catalog.schema import IMAGE_SCHEMA, SPLITS, Category, ClassSplit, DatasetManifest, SplitOrigin
from catalog.storage import ParquetSource, Storage
from catalog.store import Catalog, DatasetNotFound, default_root

__all__ = [
    "IMAGE_SCHEMA", "SPLITS", "Category", "ClassSplit", "DatasetManifest", "SplitOrigin",
    "Catalog", "DatasetNotFound", "default_root", "Storage", "ParquetSource",
]
