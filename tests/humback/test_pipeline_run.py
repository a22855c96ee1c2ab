"""humback/pipeline_run.py's pieces that need no model (the pipeline runs them end to end in
tests/test_pipeline.py)."""
from __future__ import annotations

from humback.pipeline_run import heldout_files


def test_heldout_files_are_hashed_only_when_local(tmp_path):
    local = tmp_path / "heldout.jsonl"
    local.write_text('{"id": "a", "instruction": "q", "output": "a"}\n')
    assert heldout_files(str(local)) == [local]
    assert heldout_files(f"pairs:{local}") == [local]
    assert heldout_files("guanaco:timdettmers/openassistant-guanaco/x.jsonl") == []
