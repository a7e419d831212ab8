"""sscflow: longitudinal chest CT to lung-shrinkage maps, as a resumable Dask dataflow.

Importing the package stays light: torch, dask-kubernetes and plotting libraries are imported
inside the functions that need them.
"""

from sscflow import _moved
from sscflow.errors import (
    ConfigError,
    IncompleteOutputError,
    IngestError,
    InputImageError,
    ManifestError,
    MissingDependencyError,
    MissingInputError,
    SegmentationError,
    SscflowError,
)

__version__ = "0.1.0"

_moved.install()  # sscflow 0.1's module paths (sscflow.registration, ...) still import

__all__ = [
    "ConfigError",
    "IncompleteOutputError",
    "IngestError",
    "InputImageError",
    "ManifestError",
    "MissingDependencyError",
    "MissingInputError",
    "SegmentationError",
    "SscflowError",
    "__version__",
]
