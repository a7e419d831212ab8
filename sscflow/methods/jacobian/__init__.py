"""Log-Jacobian maps: log det(I + grad u) of a displacement field, blockwise, exact against ITK.

``log_jacobian`` works on numpy (in memory, all cores) or dask (lazy, blockwise, any size);
``log_jacobian_zarr`` streams a Zarr field slab by slab with memory bounded by the slab size;
``summarize`` gives mean, median, percentiles and the folded fraction inside a mask;
``log_jacobian_patient`` is the stage that turns ``patients/<id>/displacement`` into
``patients/<id>/log_jacobian`` with its summary.

Sign convention: u is defined on the baseline grid with ``followup(x + u(x)) ~ baseline(x)``, so
tissue that shrinks from baseline to follow-up has a negative log-Jacobian.
"""

from sscflow.methods.jacobian.core import DEFAULT_FLOOR, log_floor, log_jacobian, log_jacobian_zarr
from sscflow.methods.jacobian.stage import log_jacobian_patient
from sscflow.methods.jacobian.summary import DEFAULT_PERCENTILES, summarize

__all__ = [
    "DEFAULT_FLOOR",
    "DEFAULT_PERCENTILES",
    "log_floor",
    "log_jacobian",
    "log_jacobian_patient",
    "log_jacobian_zarr",
    "summarize",
]
