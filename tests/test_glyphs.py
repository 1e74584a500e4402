"""experiments/glyphs.py: the many-class glyph set rendered from four small Debian font packages
(installed by .ci/run), its checks against fallback glyphs and near-duplicate designs."""
import itertools

import numpy as np
import torch

from experiments import glyphs, sweep

PACKAGES = sweep.SMOKE_GLYPHS["packages"]


def test_rendered_glyphs_are_real_characters_in_distinct_designs(tmp_path):
    images, chars, record = glyphs.build(str(tmp_path), 8, packages=PACKAGES)
    designs = len(record["designs"])
    assert images.shape == (designs, 8, 32, 32) and images.dtype == np.uint8
    assert len(set(chars)) == 8 and all(0x4E00 <= ord(c) < 0xA000 for c in chars)
    flat = images.reshape(designs, 8, -1).astype(np.int16)
    assert (flat.max(-1) > 0).all()  # ink in every glyph
    for face, drawn in zip(record["designs"], flat):  # no box: all characters differ
        face = {**face, "mapped": set()}
        box = glyphs.render(face, [glyphs.MISSING]).reshape(1, -1).astype(np.int16)
        assert (np.abs(drawn - box).max(-1) > 0).all(), face["name"]
        assert len({row.tobytes() for row in drawn}) == 8, face["name"]
    for a, b in itertools.combinations(range(designs), 2):
        assert glyphs.correlation(images[a], images[b]) <= glyphs.THRESHOLD
    assert record["dropped"] and all(d["r"] > glyphs.THRESHOLD for d in record["dropped"])
    again, chars_again = glyphs.load(str(tmp_path))
    assert np.array_equal(again, images) and chars_again == chars


def test_shifted_moves_the_glyph_onto_black():
    image = -torch.ones(1, 32, 32)
    image[0, 10:20, 12:18] = 1.0
    torch.manual_seed(0)
    ds = glyphs.Shifted([(image, 3)], 2)
    moved = [ds[0][0] for _ in range(20)]
    assert all(m.shape == image.shape and (m == 1).sum() == 60 for m in moved)  # ink kept
    assert len({m.numpy().tobytes() for m in moved}) > 5 and ds[0][1] == 3
