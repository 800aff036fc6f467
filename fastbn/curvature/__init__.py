"""Curvature of a model's loss through batch norm.

HessianOperator: Hessian-vector products as a linear operator on flat parameter vectors
    (K at a time through fastbn's K-batched kernels; scipy interop).
eigenvalues: top eigenpairs by Lanczos or power iteration.
trace: Hutchinson / Hutch++ trace estimates.
spectral_density, stochastic_lanczos_quadrature, smoothed_density: eigenvalue density by SLQ.
activation_hessian: gradient and HVPs of the loss w.r.t. one layer's output.
NonFiniteLossError: raised where a batch's loss is NaN or infinite.
NonFiniteProductError: raised where an estimator meets a NaN or infinite Hessian-vector
    product.
"""

from fastbn.curvature.activation import ActivationHessian, activation_hessian
from fastbn.curvature.density import (smoothed_density, spectral_density,
                                      stochastic_lanczos_quadrature)
from fastbn.curvature.lanczos import NonFiniteProductError, eigenvalues
from fastbn.curvature.operator import HessianOperator, NonFiniteLossError
from fastbn.curvature.trace import trace

__all__ = ["ActivationHessian", "HessianOperator", "NonFiniteLossError",
           "NonFiniteProductError", "activation_hessian", "eigenvalues", "smoothed_density",
           "spectral_density", "stochastic_lanczos_quadrature", "trace"]
