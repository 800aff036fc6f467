"""One training loop for every experiment: plain SGD, optional probes and evaluations.

Divergence is data: the first non-finite training loss is recorded as
`diverged_at_step`, training of that run stops there, and the caller goes on.

Data-parallel training (`process_group`): each process trains its copy of the model
(batch norms synchronised over the group) on an equal shard of every batch and
backpropagates its local mean loss; gradients, loss and accuracy are then averaged over
the group in one all_reduce, which makes them those of the concatenated batch, as DDP
with SyncBatchNorm does. Every process stays bit-for-bit in step.
"""

import math
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fastbn.backends.distributed import all_reduce_packed
from fastbn.probes import SmoothnessProbe


def _average_over_group(model, metrics, process_group):
    """Average the gradients (in place) and the scalar `metrics` over the group, in one
    all_reduce; returns the averaged metrics."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    values = [m.reshape(1).to(grads[0].dtype) for m in metrics.values()]
    world = dist.get_world_size(process_group)
    sums = all_reduce_packed(grads + values, process_group)
    for grad, total in zip(grads, sums):
        torch.div(total, world, out=grad)
    return {name: total[0] / world for name, total in zip(metrics, sums[len(grads):])}


@torch.no_grad()
def evaluate_classifier(model, criterion, inputs, targets, batch_size=1000):
    """Loss and accuracy in evaluation mode (BN on running statistics), training flag restored."""
    was_training = model.training
    model.eval()
    try:
        total_loss, correct = 0.0, 0
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
            outputs = model(x)
            total_loss += criterion(outputs, y).item() * len(x)
            correct += (outputs.argmax(dim=1) == y).sum().item()
    finally:
        model.train(was_training)
    return total_loss / len(inputs), correct / len(inputs)


def probe_columns(records):
    """Probe records (one dict per probed step) as {field: list over probed steps}."""
    if not records:
        return {}
    return {key: [r[key] for r in records] for key in records[0]}


def train(model, criterion, batches, steps, *, lr, probe_every=0, multipliers=None, sharpness=False,
          seed=0, evaluate=None, eval_every=0, classification=False, progress=True, desc="",
          process_group=None):
    """Train `model` in place with SGD(lr) for `steps` steps over `batches`, an iterable of
    (inputs, targets) (consumed lazily: the batches never all sit in memory).

    Before the update at every `probe_every`-th step (0: never) the smoothness probe runs
    on that step's batch (with the top Hessian eigenvalue when `sharpness`); every
    `eval_every` steps and at the end `evaluate(model)` gives
    a dict of metrics. Returns a JSON-ready dict of per-step curves, probe columns,
    evaluations, divergence step and the seconds spent training, probing and evaluating.

    process_group: data-parallel training (see the module docstring). Every process
    passes the same model (its BN layers synchronised over the group, e.g. by
    fastbn.convert(model, sync=True, process_group=...)) and its equal shard of each
    batch; curves and probes are those of the whole batch. `criterion` must be a mean
    over the batch. `evaluate` runs on every process.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    probe = (SmoothnessProbe(model, criterion, lr, every=probe_every, multipliers=multipliers,
                             sharpness=sharpness, seed=seed, process_group=process_group)
             if probe_every else None)
    curves = {"step": [], "loss": []}
    if classification:
        curves["accuracy"] = []
    evaluations = []
    seconds = {"train": 0.0, "probe": 0.0, "eval": 0.0}
    diverged_at = None

    def run_evaluation(step):
        start = time.perf_counter()
        evaluations.append({"step": step, **evaluate(model)})
        seconds["eval"] += time.perf_counter() - start

    model.train()
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, leave=False)
    for step, (inputs, targets) in enumerate(bar):
        if evaluate is not None and eval_every and step % eval_every == 0:
            run_evaluation(step)
        if probe is not None:
            probe(step, (inputs, targets))
        start = time.perf_counter()
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        metrics = {"loss": loss.detach()}
        if classification:
            metrics["accuracy"] = (outputs.argmax(dim=1) == targets).double().mean()
        optimizer.zero_grad(set_to_none=True)
        # Backward before the divergence check: with a group the check needs the loss of
        # the whole batch, which travels with the gradients (and every process must run
        # the backward's collectives alike).
        loss.backward()
        if process_group is not None:
            metrics = _average_over_group(model, metrics, process_group)
        loss_value = metrics["loss"].item()
        curves["step"].append(step)
        curves["loss"].append(loss_value)
        if classification:
            curves["accuracy"].append(metrics["accuracy"].item())
        if not math.isfinite(loss_value):
            diverged_at = step
            seconds["train"] += time.perf_counter() - start
            break
        optimizer.step()
        seconds["train"] += time.perf_counter() - start
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3g}")
    bar.close()
    completed = len(curves["step"]) - (diverged_at is not None)   # updates applied
    # The final weights, unless the last evaluation already saw them (a divergence
    # right after an evaluation step applies no update).
    if evaluate is not None and not (evaluations and evaluations[-1]["step"] == completed):
        run_evaluation(completed)
    if probe is not None:
        seconds["probe"] = probe.seconds
    return {"lr": lr, "steps_completed": completed,
            "diverged_at_step": diverged_at, "curves": curves, "evaluations": evaluations,
            "probes": probe_columns(probe.records) if probe is not None else {},
            "seconds": seconds}
