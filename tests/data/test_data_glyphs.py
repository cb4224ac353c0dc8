"""tallytrain.data.glyphs: classes, rendering, cache, errors (a few classes,
mostly two faces, so that each test renders in well under a second)."""

from __future__ import annotations

import os
import unicodedata

import numpy as np
import pytest
import torch

from tallytrain.data import glyphs, load_dataset
from tallytrain.data.glyphs import default_fonts, load_glyphs, select_classes, shared_code_points
from tallytrain.fl.config import DataConfig


@pytest.fixture(scope="module")
def two_faces():
    fonts = default_fonts()
    return [fonts[0], fonts[-1]]  # DejaVuSans and DejaVuSerif-BoldItalic


def test_matplotlib_ships_the_default_faces():
    fonts = default_fonts()
    assert len(fonts) == 12 and all(os.path.isfile(p) for p in fonts)


def test_classes_are_shared_printable_visible_and_distinct():
    # Every default face at once: the full selection, as load_glyphs makes it.
    shared = shared_code_points(default_fonts())
    assert all(unicodedata.category(chr(c))[0] not in "CZ" for c in shared)
    assert ord(" ") not in shared and ord("A") in shared
    classes = select_classes(default_fonts(), None)
    assert len(classes) > 2000 and classes == sorted(classes) and set(classes) <= set(shared)
    assert 0xFFFC not in classes  # OBJECT REPLACEMENT CHARACTER renders blank
    assert ord("A") in classes and 0x391 not in classes  # Greek Alpha is Latin A's homoglyph
    assert ord("a") in classes and 0x3B1 in classes  # Latin a and Greek alpha differ


def test_rendering_is_deterministic_and_every_class_is_present(tmp_path, two_faces):
    a = load_glyphs(6, renders_per_face=2, fonts=two_faces, cache_dir=str(tmp_path / "a"))
    b = load_glyphs(6, renders_per_face=2, fonts=two_faces, cache_dir=str(tmp_path / "b"))
    files = [list((tmp_path / d / "glyphs").iterdir()) for d in ("a", "b")]
    assert len(files[0]) == len(files[1]) == 1 and files[0][0].name == files[1][0].name
    assert files[0][0].read_bytes() == files[1][0].read_bytes()
    assert torch.equal(a.x, b.x) and a.code_points == b.code_points
    assert a.x.shape == (6 * 2 * 2, 1, 20, 20) and a.x.dtype == torch.float32
    assert 0.0 <= float(a.x.min()) and float(a.x.max()) <= 1.0
    assert torch.bincount(a.y).tolist() == [4] * 6
    assert torch.bincount(a.faces).tolist() == [12, 12]
    assert (a.x.flatten(1).amax(1) > 0.25).all()  # no blank sample
    # the jitter differs between renders of one class in one face
    assert not torch.equal(a.x[0], a.x[1])
    assert a.face_names == ("DejaVuSans", "DejaVuSerif-BoldItalic")
    other = load_glyphs(
        6, renders_per_face=2, seed=1, fonts=two_faces, cache_dir=str(tmp_path / "a")
    )
    assert not torch.equal(other.x, a.x) and torch.equal(other.y, a.y)


def test_a_class_renders_the_same_whatever_the_number_of_classes(tmp_path, two_faces):
    small = load_glyphs(3, renders_per_face=2, fonts=two_faces, cache_dir=str(tmp_path))
    large = load_glyphs(5, renders_per_face=2, fonts=two_faces, cache_dir=str(tmp_path))
    assert large.code_points[:3] == small.code_points
    assert torch.equal(large.x[: len(small.x)], small.x)


def test_the_cache_is_reused(tmp_path, two_faces, monkeypatch):
    first = load_glyphs(4, renders_per_face=1, fonts=two_faces, cache_dir=str(tmp_path))

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(glyphs, "render", no_render)
    again = load_glyphs(4, renders_per_face=1, fonts=two_faces, cache_dir=str(tmp_path))
    assert torch.equal(first.x, again.x)
    with pytest.raises(AssertionError, match="rendered again"):
        load_glyphs(4, renders_per_face=2, fonts=two_faces, cache_dir=str(tmp_path))


def test_dataset_exposes_faces_as_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLYTRAIN_CACHE_DIR", str(tmp_path))
    ds = load_dataset(DataConfig(dataset="glyphs", num_classes=3))
    assert ds.name == "glyphs3" and ds.num_classes == 3 and ds.input_shape == (1, 20, 20)
    assert len(ds.y) == 3 * 12 * glyphs.DEFAULT_RENDERS_PER_FACE
    assert len(ds.group_names) == 12 and torch.bincount(ds.groups).tolist() == [9] * 12
    assert ds.info["code_points"] == [ord("!"), ord('"'), ord("#")]


def test_too_many_classes_is_refused_naming_the_flag(tmp_path):
    display = os.path.join(glyphs.font_folder(), "DejaVuSerifDisplay.ttf")
    available = len(select_classes([display], None))
    with pytest.raises(
        ValueError,
        match=rf"--num-classes {available + 1} exceeds the "
        rf"{available} glyph classes",
    ):
        load_glyphs(available + 1, fonts=[display], cache_dir=str(tmp_path))
    for bad in (1, 2.5):
        with pytest.raises(ValueError, match="--num-classes must be an integer >= 2"):
            load_glyphs(bad, cache_dir=str(tmp_path))


def test_a_missing_font_is_refused_naming_it(tmp_path, two_faces):
    missing = str(tmp_path / "NoSuchFace.ttf")
    with pytest.raises(ValueError, match=r"font file '.*NoSuchFace\.ttf' \(--fonts\) does not"):
        load_glyphs(3, fonts=two_faces + [missing], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--fonts names a font file twice"):
        load_glyphs(3, fonts=two_faces + two_faces[:1], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="renders_per_face"):
        load_glyphs(3, renders_per_face=0, cache_dir=str(tmp_path))


def test_renders_keep_height_information():
    # '-' and '_' differ only in height: the fixed baseline keeps them apart.
    fonts = glyphs._load_fonts(default_fonts()[:1])
    rows = [np.flatnonzero(glyphs._downsample(glyphs._place(fonts[0], c)).max(1)) for c in "-_"]
    assert rows[0].max() < rows[1].min()
