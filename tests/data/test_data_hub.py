"""Hub dataset ids: the real huggingface_hub code path, pointed at local files.

No test here reaches the network. A fake hub cache (the folder layout
``hf_hub_download`` itself reads: ``datasets--owner--name/refs/main`` and
``snapshots/<commit>/<file>``) lets offline mode resolve an id to a local file, and an
empty cache shows the one-line error a user gets when the hub cannot be reached.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.guanaco import read_guanaco
from data.hub import resolve
from data.lima import read_lima
from data.pairs import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT / ".." / "shared"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in offline mode (constants are read at import, so patch both)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _put_in_cache(cache: Path, repo_id: str, filename: str, source: Path) -> None:
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    target = repo / "snapshots" / COMMIT / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())


def test_offline_hub_id_is_one_line_data_error(offline_cache: Path) -> None:
    with pytest.raises(DataError) as err:
        read_lima("GAIR/lima")
    message = str(err.value)
    assert "\n" not in message
    assert "GAIR/lima" in message and "'train.jsonl'" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback


def test_offline_env_var_in_a_fresh_process(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 exactly as a user sets it, before huggingface_hub is imported."""
    code = (
        "import sys\nfrom data import read_guanaco, DataError\n"
        "try:\n    read_guanaco('timdettmers/openassistant-guanaco')\n"
        "except DataError as e:\n    print(e)\n    sys.exit(3)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path), HF_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "timdettmers/openassistant-guanaco" in lines[0]


def test_hub_id_resolves_through_the_cache(offline_cache: Path, tmp_path: Path) -> None:
    local = tmp_path / "train.jsonl"
    local.write_text(json.dumps({"text": "### Human: hi### Assistant: hello"}) + "\n")
    _put_in_cache(offline_cache, "timdettmers/openassistant-guanaco",
                  "openassistant_best_replies_train.jsonl", local)
    pairs, stats = read_guanaco("timdettmers/openassistant-guanaco")  # the default file
    assert [(p.instruction, p.output) for p in pairs] == [("hi", "hello")]
    assert stats["rows"] == 1


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is not available")
def test_hub_id_with_a_file_path_on_real_data(offline_cache: Path) -> None:
    real = SHARED / "data" / "guanaco" / "openassistant_best_replies_eval.jsonl"
    _put_in_cache(offline_cache, "timdettmers/openassistant-guanaco",
                  "openassistant_best_replies_eval.jsonl", real)
    pairs, stats = read_guanaco("timdettmers/openassistant-guanaco/openassistant_best_replies_eval.jsonl")
    assert stats["kept"] == len(pairs) == 518


def test_resolve_local_forms(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert resolve(tmp_path / "train.jsonl", "x") == tmp_path / "train.jsonl"
    assert resolve(tmp_path, "train.jsonl") == tmp_path / "train.jsonl"
    with pytest.raises(DataError, match="folder has no 'test.jsonl'"):
        resolve(tmp_path, "test.jsonl")
    with pytest.raises(DataError, match="no such file, and not a hub dataset id"):
        resolve(tmp_path / "missing.jsonl", "x")  # absolute path: never sent to the hub


def test_bare_hub_id_without_default_file_needs_a_file(offline_cache: Path) -> None:
    with pytest.raises(DataError, match="name the file inside the hub dataset"):
        resolve("allenai/c4", None)
