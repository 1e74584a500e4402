"""Tests for data.py: the datasets (the latent cache is tested in test_vae.py, with vae.py
encode)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import corrupt
from support import data


def test_digits():
    ds = data.load_dataset("digits", split="all")
    assert len(ds) == 1797 and ds.images.dtype == torch.uint8
    assert ds.images.shape == (1797, 1, 8, 8) and ds.num_classes == 10
    image, label = ds[5]
    assert image.dtype == torch.float32 and image.shape == (1, 8, 8)
    x = data.to_float(ds.images)
    assert x.min() == -1 and x.max() == 1
    assert np.bincount(ds.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    train, test = data.load_dataset("digits"), data.load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1617, 180)
    assert np.array_equal(np.sort(np.concatenate([train.labels, test.labels])), np.sort(ds.labels))
    big = data.load_dataset("digits", image_size=16)
    assert big.images.shape[1:] == (1, 16, 16) and big.image_size == 16


def test_per_class_indices_are_stratified_seeded_and_spread():
    labels = data.load_dataset("digits").labels
    a, b = data.per_class_indices(labels, 30, seed=0), data.per_class_indices(labels, 30, seed=1)
    assert np.bincount(labels[a]).tolist() == [30] * 10 and len(set(a.tolist())) == 300
    assert np.array_equal(a, data.per_class_indices(labels, 30, seed=0))  # the seed decides
    assert not np.array_equal(a, b)
    assert a.max() > 0.9 * len(labels)  # from the whole split, not its first writers
    with pytest.raises(ValueError, match="must be in"):
        data.per_class_indices(labels, 1000, seed=0)


def test_fashion_mnist():
    train = data.load_dataset("fashion-mnist")
    test = data.load_dataset("fashion-mnist", split="test", pad=True)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.images.shape[1:] == (1, 32, 32) and test.image_size == 32
    assert test.images[:, :, :2].max() == 0  # the pad is background
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    image, label = train[0]
    assert label == 9 and image.min() >= -1 and image.max() <= 1  # the first train image is a boot


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image folder"):
        data.load_dataset("folder", root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="caption file"):
        data.load_dataset("captions", root=str(tmp_path / "nope.tsv"))
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("cifar")


def write_image(path, size, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_dataset(tmp_path):
    write_image(tmp_path / "cat" / "a.png", (40, 30), (255, 0, 0))
    write_image(tmp_path / "cat" / "b.jpg", (30, 50), (255, 0, 0))
    write_image(tmp_path / "dog" / "c.png", (64, 64), (0, 0, 255))
    ds = data.load_dataset("folder", root=str(tmp_path), image_size=16)
    assert len(ds) == 3 and ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    image, label = ds[2]
    assert image.shape == (3, 16, 16) and label == 1
    assert torch.allclose(image[2], torch.ones(16, 16)) and torch.allclose(image[0],
                                                                           -torch.ones(16, 16))
    assert ds[1][0].shape == (3, 16, 16)
    ds.labels = corrupt.corrupt_labels(ds.labels, 1.0, 0, 2)  # conditions are read from .labels
    assert [ds[i][1] for i in range(3)] == [1, 1, 0]
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    ds = data.load_dataset("folder", root=str(tmp_path), image_size=16)  # the probe passes it
    assert [os.path.basename(p) for p, _ in data.unreadable_images(ds.paths)] == ["broken.png"]
    with pytest.raises(RuntimeError, match="broken.png"):  # named when it is read
        data.read_image(str(tmp_path / "dog" / "broken.png"), 16)


def test_caption_dataset(tmp_path):
    write_image(tmp_path / "img" / "0.png", (20, 20), (0, 255, 0))
    write_image(tmp_path / "img" / "1.png", (48, 24), (10, 10, 10))
    tsv = tmp_path / "train.tsv"
    tsv.write_text("img/0.png\ta green square\nimg/1.png\ta dark\tbanner\n", encoding="utf-8")
    ds = data.load_dataset("captions", root=str(tsv), image_size=8)
    assert ds.captions == ["a green square", "a dark\tbanner"] and ds.labels is None
    image, caption = ds[0]
    assert image.shape == (3, 8, 8) and caption == "a green square"
    assert torch.allclose(image[1], torch.ones(8, 8))
    (tmp_path / "img" / "2.png").write_bytes(b"\x89PNG truncated")
    tsv.write_text("img/0.png\ta green square\nimg/2.png\tbroken\n", encoding="utf-8")
    ds = data.load_dataset("captions", root=str(tsv), image_size=8)  # named when it is read
    with pytest.raises(RuntimeError, match="2.png"):
        ds[1]
    tsv.write_text("img/0.png a caption without a tab\n", encoding="utf-8")
    with pytest.raises(ValueError, match="train.tsv:1"):
        data.load_dataset("captions", root=str(tsv))


def test_folder_channels_from_the_images_and_transparency_on_white(tmp_path):
    for name, mode, value in (("grey", "L", 100), ("grey-rgb", "RGB", (100, 100, 100)),
                              ("colour", "RGB", (100, 50, 10))):
        os.makedirs(tmp_path / name / "a")
        Image.new(mode, (8, 8), value).save(tmp_path / name / "a" / "0.png")
    assert data.load_dataset("folder", str(tmp_path / "grey"), image_size=8).channels == 1
    assert data.load_dataset("folder", str(tmp_path / "grey-rgb"), image_size=8).channels == 1
    colour = data.load_dataset("folder", str(tmp_path / "colour"), image_size=8)
    assert colour.channels == 3 and colour[0][0].shape == (3, 8, 8)
    torch.testing.assert_close(colour[0][0][:, 0, 0], torch.tensor([100, 50, 10]) / 127.5 - 1)
    os.makedirs(tmp_path / "alpha" / "a")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparent red: white once composited
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "alpha" / "a" / "0.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "alpha" / "a" / "1.png", transparency=0)  # index 0 (black) transparent
    alpha = data.load_dataset("folder", str(tmp_path / "alpha"), image_size=8)
    assert alpha.channels == 3
    red, green = alpha[0][0], alpha[1][0]
    torch.testing.assert_close(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(red[:, 4, 4], torch.ones(3))  # transparent -> white, not red
    torch.testing.assert_close(green[:, 1, 1], torch.tensor([-1.0, 1.0, -1.0]))
    torch.testing.assert_close(green[:, 4, 4], torch.ones(3))  # transparent -> white, not black


def _png(path, value, colour=False, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixel = (value, 255 - value, 40) if colour else (value,) * 3
    Image.fromarray(np.full((size, size, 3), pixel, np.uint8)).save(path)


def test_a_link_loop_in_a_class_folder_adds_no_images(tmp_path, capsys):
    """apple/up -> .. made 30 images into 1,230, most labelled with the wrong class."""
    for c in ("apple", "pear"):
        for i in range(15):
            _png(str(tmp_path / c / f"{i}.png"), 10 * i)
    os.symlink("..", tmp_path / "apple" / "up")
    ds = data.load_dataset("folder", str(tmp_path), image_size=8)
    assert len(ds) == 30 and ds.class_names == ["apple", "pear"]
    assert np.bincount(ds.labels).tolist() == [15, 15]
    assert "1 linked folders" in capsys.readouterr().out


def test_colour_classes_after_100_grey_files_keep_their_colour(tmp_path):
    """The channel probe looked at the first 100 sorted files only: a folder whose first class
    is grey read its colour classes as grey."""
    for i in range(120):
        _png(str(tmp_path / "a_grey" / f"{i:03d}.png"), i)
    for i in range(10):
        _png(str(tmp_path / "b_colour" / f"{i}.png"), 20 * i, colour=True)
    ds = data.load_dataset("folder", str(tmp_path), image_size=8)
    assert ds.channels == 3
    image, label = ds[125]
    assert label == 1 and not torch.equal(image[0], image[1])  # colour kept


def test_16_bit_images_keep_their_values(tmp_path):
    """A 16-bit grey PNG (mode I;16) was read through 8 bits with clipping: 99 % white."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    os.makedirs(tmp_path / "c")
    Image.fromarray(ramp).save(tmp_path / "c" / "deep.png")
    with Image.open(tmp_path / "c" / "deep.png") as im:
        assert im.mode.startswith("I")  # what PIL makes of it
    x = data.read_image(str(tmp_path / "c" / "deep.png"), 64, channels=1)
    expected = data.to_float(torch.from_numpy(np.rint(ramp / 257).astype(np.uint8)))
    assert (x[0] - expected).abs().max() <= 2 / 255  # not clipped: the ramp survives
    assert (x > 0.99).float().mean() < 0.02
