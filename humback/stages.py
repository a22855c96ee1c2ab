"""Cached pipeline stages: a stage re-runs only when its config or its inputs changed.

Each stage of a run lives in its own folder ``WORKDIR/<stage>/`` and, when it has finished,
writes ``manifest.json`` there (last, atomically) with

* ``config``: the settings the stage ran with (model, hyper-parameters, data specs ...), not
  where it ran: the device (and the dtype it picks) is left out on purpose, so a run started
  on a CPU can continue on a GPU (or back) and keep its finished stages;
* ``inputs``: the SHA-256 of every input file (earlier stages' outputs);
* ``outputs``: the files it produced.

A later run skips the stage when the manifest matches exactly. An edited input or setting
changes a hash, so the stage and everything downstream of it (whose inputs then change too)
run again, in an emptied folder. A stage interrupted half-way has no manifest: it runs again,
and stages that write append-only (augmentation, rating, training checkpoints) resume where
they stopped, but only if it was started with the same config and inputs (``started.json``,
written when it starts): a half-done stage of other settings is cleared, never resumed, so
that rows rated by an old rater or a checkpoint of another training set cannot leak in.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STARTED = "started.json"


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of every file under a folder (names and contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _expected(config: Mapping[str, Any], inputs: Sequence[str | os.PathLike]) -> dict[str, Any]:
    return {"config": json.loads(json.dumps(config, default=str)),
            "inputs": {str(Path(i)): file_hash(i) for i in inputs}}


def is_done(stage_dir: Path, config: Mapping[str, Any], inputs: Sequence[str | os.PathLike]) -> bool:
    """True when ``stage_dir`` holds a manifest for exactly this config and these inputs."""
    m = stage_dir / MANIFEST
    if not m.exists():
        return False
    saved = json.loads(m.read_text())
    want = _expected(config, inputs)
    return saved.get("config") == want["config"] and saved.get("inputs") == want["inputs"] and \
        all((stage_dir / o).exists() for o in saved.get("outputs", []))


def run_stage(name: str, workdir: Path, config: Mapping[str, Any], inputs: Sequence[str | os.PathLike],
              body: Callable[[Path], Sequence[str]], redo: bool = False) -> tuple[Path, bool]:
    """Run ``body(stage_dir) -> output names`` unless already done; return (stage_dir, ran).

    ``redo`` clears the stage folder first (``pipeline.py --from STAGE``): append-only outputs
    from an earlier run would otherwise be taken as work already done."""
    stage_dir = workdir / name
    if not redo and is_done(stage_dir, config, inputs):
        print(f"[{name}] up to date, skipped ({stage_dir})")
        return stage_dir, False
    expected = _expected(config, inputs)
    started = stage_dir / STARTED
    resumable = not redo and not (stage_dir / MANIFEST).exists() and started.exists() and \
        json.loads(started.read_text()) == expected
    if stage_dir.exists() and not resumable:
        # finished with other settings, or half-done with other (or unknown) ones: its files would
        # be taken for work already done by the append-only writers and --resume
        print(f"[{name}] {'redoing' if redo else 'settings or inputs changed'}: clearing {stage_dir}")
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(started, expected)
    print(f"[{name}] {'resuming' if resumable else 'running'} ...")
    t0 = time.perf_counter()
    outputs = list(body(stage_dir))
    manifest = expected | {"stage": name, "outputs": outputs, "seconds": round(time.perf_counter() - t0, 1),
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_atomic(stage_dir / MANIFEST, manifest)
    print(f"[{name}] done in {manifest['seconds']} s")
    return stage_dir, True


def _write_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
