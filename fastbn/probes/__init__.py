"""Smoothness probes along the training trajectory (Santurkar et al. 2018).

- `gradient_step_probe`: loss and gradient change along −g on one batch (Figure 4 measures).
- `theory_checks`: both sides of Theorems 4.1 and 4.2 per BN layer.
- `top_hessian_eigenvalue`: sharpness via fastbn.curvature.
- `SmoothnessProbe`: a training-loop callback that runs the probes every k steps.

No probe changes the model: parameters, buffers and training flags stay bit-for-bit.
"""

from fastbn.probes.callback import SmoothnessProbe
from fastbn.probes.landscape import DEFAULT_MULTIPLIERS, gradient_step_probe
from fastbn.probes.sharpness import top_hessian_eigenvalue
from fastbn.probes.theory import theory_checks

__all__ = ["DEFAULT_MULTIPLIERS", "SmoothnessProbe", "gradient_step_probe",
           "theory_checks", "top_hessian_eigenvalue"]
