"""SmoothnessProbe: landscape probes from inside any training loop."""

import json
import math
import numbers
import time

import torch.distributed as dist

from fastbn import _checks
from fastbn.curvature import NonFiniteProductError
from fastbn.probes import _functional
from fastbn.probes.landscape import check_lr, check_multipliers, gradient_step_probe
from fastbn.probes.sharpness import top_hessian_eigenvalue


def json_safe(value):
    """`value` with numpy scalars as Python numbers, NaN (a missing value) as None and ±inf
    (a blown-up probe step, a diverged loss) as the strings "inf" and "-inf", which
    float() reads back: strict JSON has neither, and the two mean different things."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class SmoothnessProbe:
    """Call `probe(step, batch)` once per training step, before the optimiser update.

    Every `every` steps it runs `gradient_step_probe` (and, with `sharpness=True`, the
    top Hessian eigenvalue by at most `sharpness_max_iter` Lanczos steps; NaN where the
    step's loss or a Hessian-vector product is not finite) on that step's batch, keeps
    the record in `records` and, with `log_path`, appends it as one JSON line (NaN
    written as null, ±inf as "inf" or "-inf"). The model is left exactly as it was.
    `seconds` is the wall time spent probing, to keep apart from training time. The
    probed step lengths are multiples of `lr`; under a learning-rate schedule, set
    `probe.lr` as it changes.

    With `process_group` (data-parallel training), every process calls it with its shard
    of the batch and gets the records of the concatenated batch (see
    `gradient_step_probe`); only the group's rank 0 writes `log_path`.
    """

    def __init__(self, model, criterion, lr, *, every=10, log_path=None, multipliers=None,
                 sharpness=False, sharpness_max_iter=30, seed=0, process_group=None):
        self.model, self.criterion, self.lr = model, criterion, check_lr(lr)
        self.every = _checks.check_count(every, "every")
        # Refused here rather than at the first probed step, after its gradient probe.
        self.sharpness_max_iter = _checks.check_count(sharpness_max_iter,
                                                      "sharpness_max_iter")
        _functional.check_membership(process_group, "SmoothnessProbe")
        writes_log = process_group is None or dist.get_rank(process_group) == 0
        self.log_path = log_path if writes_log else None
        self.process_group = process_group
        _checks.check_seed(seed, "SmoothnessProbe", generator=False)   # seed + step per probe
        # a list: a generator would be spent by the first probe
        self.multipliers, self.seed = check_multipliers(multipliers), seed
        self.sharpness = sharpness
        self.records = []
        self.seconds = 0.0

    def _sharpness(self, step, batch, loss):
        """The top Hessian eigenvalue, NaN where a run is blowing up: a non-finite loss,
        or a finite one whose Hessian-vector products overflow (no curvature to measure)."""
        if not math.isfinite(loss):
            return math.nan
        try:
            return top_hessian_eigenvalue(
                self.model, self.criterion, batch, seed=_checks.wrapped_seed(self.seed + step),
                tol=1e-2, max_iter=self.sharpness_max_iter, process_group=self.process_group)
        except NonFiniteProductError:
            return math.nan

    def __call__(self, step, batch):
        """The probe record for `step`, or None when this step is not probed."""
        if step % self.every:
            return None
        start = time.perf_counter()
        record = {"step": step, **gradient_step_probe(
            self.model, self.criterion, batch, self.lr, multipliers=self.multipliers,
            process_group=self.process_group)}
        if self.sharpness:
            record["sharpness"] = self._sharpness(step, batch, record["loss"])
        self.seconds += time.perf_counter() - start
        line = json.dumps(json_safe(record))
        self.records.append(record)
        if self.log_path is not None:
            with open(self.log_path, "a") as log:
                log.write(line + "\n")
        return record
