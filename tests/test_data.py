"""fastresnet.data: restricted unpickling, CIFAR loading (folder and .tar.gz), digits, sampling, augmentation."""
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from fastresnet import data


def _batch_bytes(n, seed, label_key=b"labels"):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"test", label_key: [int(v) for v in rng.integers(0, 10, n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    return pickle.dumps(batch, protocol=2), batch


def _write_cifar10(root, n=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        raw, batches[name] = _batch_bytes(n, i)
        (folder / name).write_bytes(raw)
    return folder, batches


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    with pytest.raises(data.UnsafePickleError, match=r"evil_batch.*refusing.*posix\.system|evil_batch.*os\.system"):
        data.restricted_load(pickle.dumps({b"data": _Evil()}, protocol=2), str(tmp_path / "evil_batch"))


def test_restricted_unpickler_loads_numpy_arrays():
    raw, batch = _batch_bytes(4, 0)
    loaded = data.restricted_load(raw, "batch")
    np.testing.assert_array_equal(loaded[b"data"], batch[b"data"])
    assert loaded[b"labels"] == batch[b"labels"]


def test_cifar_from_folder_and_archive(tmp_path):
    folder, batches = _write_cifar10(tmp_path / "a")
    train, test = data.load_cifar(str(tmp_path / "a"), 10)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert torch.equal(train.images[0], torch.from_numpy(first))      # CHW planes, as the format stores them
    assert train.labels[:6].tolist() == batches["data_batch_1"][b"labels"]
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    train2, test2 = data.load_cifar(str(archive), 10)
    assert torch.equal(train2.images, train.images) and torch.equal(test2.labels, test.labels)


def test_cifar_refuses_tampered_batch(tmp_path):
    folder, _ = _write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(data.UnsafePickleError, match="data_batch_3"):
        data.load_cifar(str(tmp_path), 10)


def test_cifar_missing_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir.*cifar-10-batches-py"):
        data.load_cifar(str(tmp_path), 10)


def test_digits_split_is_fixed():
    train, test = data.load_digits()
    assert len(train) == 1797 - data.DIGITS_TEST_SIZE and len(test) == data.DIGITS_TEST_SIZE
    assert train.images.shape[1:] == (3, 8, 8) and train.images.dtype == torch.uint8
    train2, _ = data.load_digits()
    assert torch.equal(train.labels, train2.labels)
    x = train.normalise(train.images)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 0.05   # normalised by train statistics


def test_sampler_is_a_function_of_seed_and_iteration():
    a, b = data.IterationSampler(100, 16, seed=3), data.IterationSampler(100, 16, seed=3)
    epoch0 = torch.cat([a.indices(i) for i in range(a.steps_per_epoch)])
    assert epoch0.unique().numel() == epoch0.numel() == 96                 # no repeats within an epoch
    assert torch.equal(b.indices(7), a.indices(7)) and torch.equal(b.indices(2), a.indices(2))
    assert not torch.equal(a.indices(0), a.indices(a.steps_per_epoch))      # a new order every epoch
    ranks = [data.IterationSampler(100, 16, 3, world_size=2, rank=r) for r in range(2)]
    assert torch.equal(torch.cat([s.indices(5)[s.rank_slice()] for s in ranks]), a.indices(5))


def test_augment_matches_per_image_crop_and_flip():
    x = torch.randn(5, 3, 7, 6)
    params = data.draw_augment(5, 2, True, seed=0, i=4)
    out = data.augment_batch(x, 2, params)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(5):
        r, c = params.offsets[b].tolist()
        want = padded[b, :, r:r + 7, c:c + 6]
        want = want.flip(-1) if params.flips[b] else want
        assert torch.equal(out[b], want)
    assert params.flips.any() and not params.flips.all()                    # both cases were exercised
    assert torch.equal(data.draw_augment(5, 2, True, 0, 4).offsets, params.offsets)   # deterministic


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="the image-folder dataset needs Pillow")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(tmp_path / cls / f"{k}.png")
    train = data.ImageFolder(str(tmp_path), 16, train=True, seed=0)
    assert train.classes == ["cat", "dog"] and len(train) == 4
    x, y = train[(3, 7)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 1
    assert torch.equal(train[(3, 7)][0], x)                                 # the draw is keyed, so repeatable
    val = data.ImageFolder(str(tmp_path), 16, train=False)
    assert val[0][0].shape == (3, 16, 16)
