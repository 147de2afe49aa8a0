"""Training data: samples, readers (BigEarthNet v1/v2, class folders such as EuroSAT, an admin's rasters and
polygons), splits, webdataset shards with a manifest, and deterministic streams over them."""

from .samples import TASKS, Sample, take_bands
from .shards import DatasetSpec, DatasetWriter, open_dataset

__all__ = ["TASKS", "DatasetSpec", "DatasetWriter", "Sample", "open_dataset", "take_bands"]
