"""fastbn: fused batch-norm kernels and fast second-order autodiff through batch norm."""

from fastbn.backends import get_backend, set_backend, use_backend
from fastbn.functional import batch_norm
from fastbn.nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d,
                       LazyBatchNorm3d, SyncBatchNorm, convert)

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
           "LazyBatchNorm3d", "SyncBatchNorm", "batch_norm",
           "convert", "get_backend", "set_backend", "use_backend", "__version__"]
