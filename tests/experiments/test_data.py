import pickle

import numpy as np
import pytest
import torch

from fastbn.experiments import data


def write_fake_cifar(folder, per_batch=4, test=3):
    """A tiny copy in the cifar-10-batches-py format: pickled dicts, uint8 N×3072."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        labels[name] = entry[b"labels"]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return labels


def test_cifar10_reader_on_a_fake_copy(tmp_path):
    labels = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        dataset = data.load_dataset("cifar10", data_dir=str(where))
        assert dataset.train_x.shape == (20, 3, 32, 32)
        assert dataset.test_x.shape == (3, 3, 32, 32)
        assert dataset.train_x.dtype == torch.float32
        expected = sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
        assert dataset.train_y.tolist() == expected
        assert dataset.test_y.tolist() == labels["test_batch"]
        # standardised per channel with the training set's statistics
        assert dataset.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
        assert dataset.train_x.std(dim=(0, 2, 3)) == pytest.approx([1, 1, 1], abs=1e-4)


@pytest.mark.parametrize("content", (b"not a pickle", pickle.dumps({"foo": 1})),
                         ids=("garbage", "another_pickle"))
def test_cifar10_reader_refuses_files_that_are_not_cifar_batches(tmp_path, content):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR-10 python batch"):
        data.load_cifar10(str(tmp_path))


def test_cifar10_reader_reports_missing_files(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar10(str(tmp_path))
    with pytest.raises(ValueError, match="data-dir"):
        data.load_cifar10(None)


def test_image_pixels_match_the_pickled_layout(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    pixels = np.arange(3072, dtype=np.int64) % 256
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.stack([pixels, pixels]).astype(np.uint8),
                         b"labels": [0, 1]}, f)
    images, _ = data._read_cifar_batch(str(folder / "test_batch"))
    # row-major 3×32×32: the first 1024 bytes are the red plane
    assert images[0, 0, 0, :4].tolist() == [0, 1, 2, 3]
    assert images[0, 1, 0, 0] == 1024 % 256


def test_batch_order_is_seeded_and_covers_epochs():
    a = data.batch_order(10, 3, 7, seed=5)
    b = data.batch_order(10, 3, 7, seed=5)
    assert len(a) == 7 and all(torch.equal(x, y) for x, y in zip(a, b))
    first_epoch = torch.cat(a[:3])
    assert len(set(first_epoch.tolist())) == 9  # no repeats within an epoch
    assert not all(torch.equal(x, y) for x, y in zip(a, data.batch_order(10, 3, 7, seed=6)))
    with pytest.raises(ValueError):
        data.batch_order(2, 3, 1, seed=0)


def test_stratified_split_keeps_classes_and_is_seeded():
    labels = np.repeat(np.arange(5), 10)
    images = np.arange(50)
    train_x, train_y, test_x, test_y = data._stratified_split(images, labels, seed=1)
    assert len(test_y) == 10 and np.bincount(test_y).tolist() == [2] * 5
    assert sorted(np.concatenate([train_x, test_x]).tolist()) == list(range(50))
    again = data._stratified_split(images, labels, seed=1)
    assert np.array_equal(again[0], train_x)


def test_digits_dataset_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn")
    dataset = data.load_dataset("digits", seed=0)
    assert dataset.image_shape == (1, 8, 8) and dataset.num_classes == 10
    assert len(dataset.train_y) + len(dataset.test_y) == 1797


def test_deep_linear_problem_targets_are_linear_in_inputs():
    x, t = data.deep_linear_problem(dim=10, samples=1000, seed=0)
    assert x.shape == t.shape == (1000, 10)
    solution = torch.linalg.lstsq(x, t).solution
    assert torch.allclose(x @ solution, t, atol=1e-4)


def test_the_dln_task_is_independent_of_the_initial_weights():
    """One seed, separate streams: with one generator seeded alike, A was a function of the
    uniforms behind the first layer's Xavier weights (correlation about -0.28 per seed)."""
    from fastbn.experiments import models
    correlations = []
    for seed in range(100):
        x, t = data.deep_linear_problem(dim=10, samples=20, seed=seed)
        a = torch.linalg.lstsq(x, t).solution.T
        first = models.deep_linear_net(10, 2, batch_norm=False, seed=seed)[0].weight
        correlations.append(torch.corrcoef(torch.stack([a.flatten(), first.flatten()]))[0, 1])
    assert abs(torch.stack(correlations).mean()) < 0.05   # 5 standard errors


def test_streams_of_one_seed_differ():
    from fastbn.experiments import seeding
    draws = [torch.rand(4, generator=seeding.generator(seed, stream))
             for seed, stream in ((0, "a"), (0, "b"), (1, "a"))]
    assert torch.equal(draws[0], torch.rand(4, generator=seeding.generator(0, "a")))
    assert not any(torch.equal(draws[i], draws[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
