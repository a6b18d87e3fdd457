"""Data sets, sampler and training transforms, on tiny data the tests make."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import tntvision
from tntvision.data import (
    EvalBatches,
    FashionMNIST,
    ImageFolder,
    SeededDataset,
    ShardedSampler,
    TrainBatches,
    batch_mixer,
    build_dataset,
    eval_transform,
    has_image_tensor,
    read_idx,
    train_transform,
)
from tntvision.data.splits import hold_out_indices, run_splits
from tntvision.errors import DataError

from .data_helpers import make_fashion_mnist, make_image_folder, write_idx


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    folder = make_fashion_mnist(tmp_path / "fm", n_train=40, n_test=20)
    monkeypatch.setenv("TNT_FASHION_MNIST_DIR", str(folder))
    return folder


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.gz", "a"):
        write_idx(tmp_path / name, arr)
        np.testing.assert_array_equal(read_idx(tmp_path / name), arr)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x01\x00\x00\x00\x05abcde"))
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad.gz")
    good = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(good[:-3]))
    with pytest.raises(DataError, match="needs 24"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(DataError, match="no such file") as missing:
        read_idx(tmp_path / "missing.gz")
    assert isinstance(missing.value.__cause__, FileNotFoundError)  # the cause is kept
    (tmp_path / "cut.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(64))[:-9])  # truncated gzip
    with pytest.raises(DataError, match="cut.gz: damaged or not an IDX file"):
        read_idx(tmp_path / "cut.gz")


def test_fashion_mnist_from_env_dir(fmnist):
    meta = tntvision.create_model("tnt_mini_patch4_28").meta
    train = build_dataset("fashion-mnist", "train", transform=eval_transform(meta))
    test = build_dataset("fashion-mnist", "test", transform=eval_transform(meta))
    assert (len(train), len(test)) == (40, 20)
    with pytest.raises(DataError, match="no val split"):  # the test set never stands in for validation
        build_dataset("fashion-mnist", "val")
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    raw = FashionMNIST(root=fmnist, split="test")
    assert raw[0][0].dtype == torch.uint8  # no transform: the stored uint8 image


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TNT_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        build_dataset("fashion-mnist", "train")
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_dataset("fashion-mnist", "train")
    with pytest.raises(DataError, match="splits"):
        build_dataset("fashion-mnist", "holdout")


def test_image_folder_any_mode_to_model_channels(tmp_path):
    root = make_image_folder(tmp_path / "d", mode="RGBA", fmt="png")
    grey = tntvision.create_model("tnt_mini_patch4_28").meta
    ds = build_dataset(str(root), "val", transform=eval_transform(grey))
    assert ds.classes == ["cat", "dog", "fox"] and len(ds) == 18
    x, y = ds[7]
    assert x.shape == (1, 28, 28) and y == 1  # 32 px RGBA -> 28 px grey
    ds_test = build_dataset(str(root), "test")  # falls back to val/
    assert len(ds_test) == 18


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such data folder"),
        ("empty", "data folder is empty"),
        ("no_split", "no train/ folder"),
        ("no_classes", "no class folders"),
        ("mismatch", "different classes"),
        ("no_images", "no readable images"),
    ],
)
def test_image_folder_errors(tmp_path, case, message):
    root = tmp_path / "d"
    if case == "empty":
        root.mkdir()
    elif case == "no_split":
        (root / "images").mkdir(parents=True)
    elif case == "no_classes":
        (root / "train").mkdir(parents=True)
    elif case == "mismatch":
        make_image_folder(root, classes=("a", "b"), per_class=1)
        make_image_folder(root, classes=("c",), per_class=1, splits=("val",))
    elif case == "no_images":
        (root / "train" / "a").mkdir(parents=True)
        (root / "train" / "a" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=message):
        ImageFolder(root=root, split="train", on_bad_image="skip")


def test_image_folder_bad_files_error_or_skip(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2, splits=("train",))
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolder(root=root, split="train")
    ds = ImageFolder(root=root, split="train", on_bad_image="skip")
    assert ds.skipped == 1 and len(ds) == 6
    # a file whose header is fine but whose pixels are cut off: found when read
    bad.unlink()
    truncated = root / "train" / "fox" / "4.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    strict = ImageFolder(root=root, split="train")
    index = [p for p, _ in strict.samples].index(str(truncated))
    with pytest.raises(DataError, match="4.png"):
        strict[index]
    lenient = ImageFolder(root=root, split="train", on_bad_image="skip")
    img, label = lenient[index]  # the next readable image instead
    assert img.size == (32, 32)


def test_sharded_sampler_ranks_cover_the_single_process_batches():
    n, batch = 50, 8
    one = ShardedSampler(n, global_batch=batch, seed=3)
    two = [ShardedSampler(n, global_batch=batch, seed=3, rank=r, world=2) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(2)
    full = list(one)
    assert len(full) == 48 == len(one)  # 6 whole batches, the rest dropped
    shards = [list(s) for s in two]
    for step in range(6):
        together = shards[0][step * 4 : (step + 1) * 4] + shards[1][step * 4 : (step + 1) * 4]
        assert sorted(together) == sorted(full[step * 8 : (step + 1) * 8])
    # the sample seed depends on (seed, epoch, index) only; another epoch gives another order
    assert dict(full) == {i: s for shard in shards for i, s in shard}
    one.set_epoch(3)
    assert [i for i, _ in one] != [i for i, _ in full]
    # resuming at step 4 yields the tail of the same epoch
    one.set_epoch(2, start_step=4)
    assert list(one) == full[32:] and len(one) == 16


def test_train_transform_is_reproducible_per_sample_seed(fmnist):
    meta = tntvision.create_model("tnt_mini_patch4_28").meta
    tf = train_transform(meta, crop="pad", padding=2, randaugment_magnitude=9, random_erasing=0.5)
    ds = SeededDataset(build_dataset("fashion-mnist", "train", transform=tf))
    a, b, c = ds[(5, 123)][0], ds[(5, 123)][0], ds[(5, 124)][0]
    assert a.shape == (1, 28, 28)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rgb = tntvision.create_model("tnt_s_patch16_224", img_size=64).meta
    x = train_transform(rgb)(_grey_image())  # grey 50x40 -> RGB 64x64
    assert x.shape == (3, 64, 64)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (1, 24)])
def test_in_memory_eval_batches_match_the_per_image_transform(fmnist, channels, size):
    from PIL import Image

    meta = tntvision.create_model("tnt_mini_patch4_28").meta.resolved(in_chans=channels, img_size=size)
    ds = build_dataset("fashion-mnist", "test")
    tf = eval_transform(meta)
    batches = EvalBatches(ds, meta=meta, batch_size=8, rank=1, world=2)  # rank 1 of 2: images 1, 3, 5...
    xs, ys = zip(*batches, strict=True)
    assert len(batches) == len(xs) == 2 and [len(y) for y in ys] == [8, 2]
    x, y = torch.cat(xs), torch.cat(ys)
    ref = torch.stack([tf(Image.fromarray(ds.images[i].numpy(), mode="L")) for i in range(1, 20, 2)])
    assert x.shape == ref.shape == (10, channels, size, size)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    assert y.tolist() == ds.targets[1::2].tolist()


def test_in_memory_train_batches_crop_flip_resume_and_ranks(fmnist):
    meta = tntvision.create_model("tnt_mini_patch4_28").meta
    ds = build_dataset("fashion-mnist", "train")  # 40 images
    mean, std = meta.mean[0], meta.std[0]

    def epoch(world: int, rank: int, start: int = 0) -> list:
        sampler = ShardedSampler(len(ds), global_batch=8, seed=5, rank=rank, world=world)
        sampler.set_epoch(1, start)
        return list(TrainBatches(ds, sampler, meta=meta, padding=2, hflip=0.5))

    full = epoch(1, 0)
    assert len(full) == 5 and all(x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 for x, _ in full)
    # every sample is its image, shifted by at most 2 px with zeros coming in, maybe mirrored
    order = ShardedSampler(len(ds), global_batch=8, seed=5)
    order.set_epoch(1)
    index = order.epoch_order()
    x, y = torch.cat([b[0] for b in full]), torch.cat([b[1] for b in full])
    assert y.tolist() == ds.targets[index].tolist()
    pixels = (x * std + mean) * 255  # back to 0..255
    flips = 0
    for sample, i in zip(pixels, index.tolist(), strict=True):
        img = torch.nn.functional.pad(ds.images[i].float(), (2, 2, 2, 2))  # (32, 32)
        matches = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if torch.allclose(
                sample[0],
                img[dy : dy + 28, dx : dx + 28].flip(-1) if f else img[dy : dy + 28, dx : dx + 28],
                atol=1e-3,
            )
        ]
        assert matches, f"sample of image {i} is not a padded crop of it"
        flips += all(f for *_, f in matches)
    assert 0 < flips < len(index)  # some, not all, mirrored
    # a resumed epoch continues with the same batches; two ranks together are the one-process batches
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch(1, 0, start=3), full[3:], strict=True))
    halves = [epoch(2, r) for r in range(2)]
    for step, (x1, y1) in enumerate(full):
        x2 = torch.stack([halves[j % 2][step][0][j // 2] for j in range(8)])
        y2 = torch.stack([halves[j % 2][step][1][j // 2] for j in range(8)])
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # another epoch, another order and other crops
    sampler = ShardedSampler(len(ds), global_batch=8, seed=5)
    sampler.set_epoch(2)
    assert not torch.equal(next(iter(TrainBatches(ds, sampler, meta=meta, padding=2)))[0], full[0][0])


def _grey_image():
    from PIL import Image

    return Image.fromarray(np.full((40, 50), 128, dtype=np.uint8), mode="L")


def test_batch_mixer_soft_labels():
    assert batch_mixer(num_classes=4, mixup=0, cutmix=0) is None
    mix = batch_mixer(num_classes=4, mixup=0.8, cutmix=1.0)
    x, y = mix(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert x.shape == (6, 3, 8, 8) and y.shape == (6, 4)
    torch.testing.assert_close(y.sum(1), torch.ones(6))


def test_validation_held_out_of_fashion_mnist_train(fmnist):
    """No val split of its own: a seeded tenth of train is held out, the same for any run seed; test apart."""
    splits = run_splits("fashion-mnist", val_fraction=0.1, val_seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 4, 20)
    full = FashionMNIST(root=fmnist, split="train")
    held = splits.record["val_indices"]
    assert len(set(held)) == 4 and splits.record["val_source"] == "held out of train"
    assert torch.equal(splits.val.images, full.images[held])
    kept = sorted(set(range(40)) - set(held))
    assert torch.equal(splits.train.images, full.images[kept])
    assert has_image_tensor(splits.train) and splits.val.split == "val"
    again = run_splits("fashion-mnist", val_fraction=0.1, val_seed=3)
    assert again.record["val_indices"] == held
    assert run_splits("fashion-mnist", val_fraction=0.1, val_seed=4).record["val_indices"] != held
    kept_idx, held_idx = hold_out_indices(1000, fraction=0.1, seed=0)
    assert len(held_idx) == 100 and len(set(kept_idx.tolist()) | set(held_idx.tolist())) == 1000


def test_image_folder_splits(tmp_path):
    """val/ is validation when present; with train/ and test/ only, validation is held out of train/."""
    own = make_image_folder(tmp_path / "own", per_class=4, splits=("train", "val", "test"))
    splits = run_splits(str(own), val_fraction=0.25, val_seed=0)
    assert splits.val.split == "val" and splits.test.split == "test" and len(splits.train) == 12
    carved = make_image_folder(tmp_path / "carved", per_class=4, splits=("train", "test"))
    splits = run_splits(str(carved), val_fraction=0.25, val_seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 12)
    assert not set(splits.train.samples) & set(splits.val.samples)
    assert splits.val[0][1] == splits.val.targets[0]


def test_an_image_that_cannot_be_opened_says_why_and_keeps_the_cause(tmp_path, monkeypatch):
    from PIL import Image

    from tntvision.data import open_image

    path = tmp_path / "a.png"
    Image.new("L", (4, 4)).save(path)
    open_image(path)  # readable as it is

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", deny)  # root reads any file: chmod would not show it
    with pytest.raises(DataError, match="permission denied") as exc:
        open_image(path)
    assert isinstance(exc.value.__cause__, PermissionError)
    monkeypatch.undo()
    path.write_bytes(path.read_bytes()[:20])  # truncated: the content, not the file, is at fault
    with pytest.raises(DataError, match="not a readable image") as exc:
        open_image(path)
    assert exc.value.__cause__ is not None
