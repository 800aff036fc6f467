"""One training loop for every experiment: plain SGD, optional probes and evaluations.

Divergence is data: the first non-finite training loss is recorded as
`diverged_at_step`, training of that run stops there, and the caller goes on.
"""

import math
import time

import torch
from tqdm.auto import tqdm

from fastbn.probes import SmoothnessProbe


def _accuracy(outputs, targets):
    return (outputs.argmax(dim=1) == targets).double().mean().item()


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
          seed=0, evaluate=None, eval_every=0, classification=False, progress=True, desc=""):
    """Train `model` in place with SGD(lr) for `steps` steps over `batches`, an iterable of
    (inputs, targets) (consumed lazily: the batches never all sit in memory).

    Before the update at every `probe_every`-th step (0: never) the smoothness probe runs
    on that step's batch (with the top Hessian eigenvalue when `sharpness`); every
    `eval_every` steps and at the end `evaluate(model)` gives
    a dict of metrics. Returns a JSON-ready dict of per-step curves, probe columns,
    evaluations, divergence step and the seconds spent training, probing and evaluating.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    probe = (SmoothnessProbe(model, criterion, lr, every=probe_every, multipliers=multipliers,
                             sharpness=sharpness, seed=seed)
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
        loss_value = loss.item()
        curves["step"].append(step)
        curves["loss"].append(loss_value)
        if classification:
            curves["accuracy"].append(_accuracy(outputs, targets))
        if not math.isfinite(loss_value):
            diverged_at = step
            seconds["train"] += time.perf_counter() - start
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds["train"] += time.perf_counter() - start
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3g}")
    bar.close()
    if evaluate is not None:
        run_evaluation(len(curves["step"]))
    if probe is not None:
        seconds["probe"] = probe.seconds
    return {"lr": lr, "steps_completed": len(curves["step"]) - (diverged_at is not None),
            "diverged_at_step": diverged_at, "curves": curves, "evaluations": evaluations,
            "probes": probe_columns(probe.records) if probe is not None else {},
            "seconds": seconds}
