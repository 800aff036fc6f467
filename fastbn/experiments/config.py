"""Run configurations: the default (CPU, under 30 minutes) and `--quick` (about 2 minutes)."""

import dataclasses
import math

import numpy as np


def log_grid(low, high, points):
    return tuple(float(v) for v in np.geomspace(low, high, points))


@dataclasses.dataclass
class Config:
    seed: int = 0
    dataset: str = "mnist"
    data_dir: str | None = None
    device: str = "cpu"
    quick: bool = False
    # VGG on images (paper: CIFAR-10, batch 128, lr 0.1, 15,000 steps).
    vgg_width: float = 0.125         # channels × VGG-A's (1.0 is VGG-A): CPU-sized
    vgg_hidden: int = 128            # units of the one hidden fully connected layer
    batch_size: int = 128
    vgg_lr: float = 0.1
    vgg_steps: int = 2000
    vgg_probes: int = 100            # probed steps per run (at most), evenly spaced
    vgg_multipliers: tuple = log_grid(0.5, 4.0, 8)
    eval_every: int = 100
    sharpness: bool = False          # also probe the top Hessian eigenvalue (VGG and DLN)
    # Deep linear network (paper: 25 layers, 10×10, 1000 samples, lr 1e-6, 10,000 steps).
    dln_dim: int = 10
    dln_depth: int = 25
    dln_samples: int = 1000
    dln_lr: float = 1e-6
    dln_steps: int = 10000
    dln_probes: int = 100
    dln_multipliers: tuple = log_grid(0.01, 30.0, 8)
    # Learning-rate sweep (VGG, both variants, no probes).
    sweep_lrs: tuple = (0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 2.0)
    sweep_steps: int = 300
    # Theorem checks (at init and end of training, on one fixed training batch).
    theory_batch: int = 64
    theory_channels: int = 4         # channels per BN layer with second-order checks
    theory_layers: int = 4           # BN layers (evenly spaced) with second-order checks
    theory_lanczos: int = 10         # Lanczos steps of the PSD test of H_jj

    def __post_init__(self):
        if self.data_dir is not None and self.dataset != "cifar10":
            # Recorded and in every part's resume key, it would read as a setting that acted.
            raise ValueError(f"--data-dir is read only for --dataset cifar10, not "
                             f"{self.dataset}")
        # Every other number, and every entry of a grid, is a positive size, count or rate.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "seed" or value is None or isinstance(value, (bool, str)):
                continue
            values = value if isinstance(value, tuple) else (value,)
            if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                                     for v in values):
                raise ValueError(f"{field.name} must be positive and finite"
                                 f"{' (a non-empty grid)' if isinstance(value, tuple) else ''}"
                                 f", got {value!r}")

    def as_dict(self):
        return dataclasses.asdict(self)


QUICK = dict(quick=True, vgg_width=0.125, vgg_hidden=64, batch_size=64, vgg_steps=300,
             vgg_probes=30, eval_every=50, dln_steps=600, dln_probes=30,
             sweep_lrs=(0.03, 0.1, 0.3, 1.0, 3.0), sweep_steps=150, theory_batch=32,
             theory_channels=2, theory_layers=2, theory_lanczos=6)


def make_config(*, quick=False, **overrides):
    """The default or quick configuration with the given fields replaced (None: keep)."""
    values = dict(QUICK) if quick else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values)
