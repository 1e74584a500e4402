import os

import numpy as np
import pytest

from experiments import emoji
from support import data


def test_the_emoji_folder_is_a_colour_class_folder_with_captions(tmp_path):
    emoji.main(["--out", str(tmp_path)])
    counts = {c: len(os.listdir(tmp_path / c)) for c in emoji.CLASSES}
    assert counts == {"face": 80, "animal": 111, "food": 91, "transport": 70, "sport": 42,
                      "clock": 24}
    folder = data.load_dataset("folder", str(tmp_path), image_size=16)
    assert (len(folder), folder.num_classes, folder.channels) == (418, 6, 3)
    image, label = folder[0]
    assert image.shape == (3, 16, 16) and folder.class_names[label] == "animal"
    corners = image[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    np.testing.assert_allclose(corners.numpy(), 1.0, atol=0.02)  # transparent: white
    some = np.stack([folder[i][0].numpy() for i in range(0, 418, 40)])
    assert some.std(1).max() > 0.2  # colour, not three equal channels
    captions = data.load_caption_tsv(str(tmp_path / "captions.tsv"), 16)
    assert len(captions) == 418 and "grinning face" in captions.captions
    assert captions.paths[captions.captions.index("grinning face")].endswith(
        os.path.join("face", "grinning-face.png"))


def test_a_missing_font_names_the_package(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install fonts-noto-color-emoji"):
        emoji.main(["--out", str(tmp_path), "--font", str(tmp_path / "none.ttf")])
