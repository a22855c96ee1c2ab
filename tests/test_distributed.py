"""Several processes give what one gives: train.py, generate.py and curate.py under torchrun.

Every distributed run here is two gloo processes on the CPU, started as the user would start
them (``python -m torch.distributed.run --standalone --nproc_per_node 2 SCRIPT ...``), and is
compared with one process run in-process. torchrun gives each worker one thread
(OMP_NUM_THREADS=1), so the single-process references also run on one thread: a different
thread count may sum a matmul in another order and change the last bits.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import curate
import generate
import train as train_script
from data.pairs import dropped_path
from humback.sharding import done_elsewhere, merge_parts, part_files, part_path, shard_batches
from tests.tiny import REPO, make_tiny

UNLABELLED = str(REPO / "data" / "demo" / "unlabelled.jsonl")
PAIRS = [("Name the capital of France.", "Paris is the capital of France."),
         ("Name the capital of Germany.", "Berlin is the capital of Germany."),
         ("Tell me a story opening.", "Once upon a time there was a little girl."),
         ("What comes after 1, 2, 3?", "The numbers 42 and 2023."),
         ("Where is Rome?", "Rome is in Italy."),
         ("What does a backward model do?", "It predicts the instruction an answer responds to.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "instruction": q, "output": a}) + "\n"
                            for i, (q, a) in enumerate(PAIRS * 3)))
    return path


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` from the repository root (--standalone
    picks a free port, so parallel test runs do not collide)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- training


def train_args(tiny: Path, data: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["--model", str(tiny), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "2", "--eval-frac", "0.2", "--eval-every", "3", "--save-every", "2", "--lr", "5e-3",
            "--warmup-steps", "2", "--max-len", "64", "--dtype", "fp32", "--device", "cpu", "--no-autocast",
            "--no-progress", *extra]


def test_two_ranks_train_like_one_process_with_the_same_global_batch(tiny: Path, train_data: Path,
                                                                     tmp_path: Path) -> None:
    # One process, 4 micro-batches of 2 per step; two processes, 2 micro-batches of 2 each: the
    # same 8 examples per step, in the same order. No dropout: each rank draws its own masks.
    with one_thread():
        assert train_script.main(train_args(tiny, train_data, tmp_path / "one", "--dropout", "0",
                                            "--grad-accum", "4")) == 0
    done = torchrun("train.py", *train_args(tiny, train_data, tmp_path / "two", "--dropout", "0", "--grad-accum", "2"))
    assert "global batch = 2 per rank x 2 ranks x 2 accumulation = 8 examples per step" in done.stdout

    # Stated tolerance: 1e-5, absolute, on fp32 LoRA weights of size ~0.1 (measured: ~1e-7). The
    # only difference is the order in which the four micro-batch gradients are added up.
    one = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    two = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    rows_one, rows_two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4, 5, 6]  # rank 0 alone wrote the log
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
    assert json.loads((tmp_path / "two/train_config.json").read_text())["global_batch"] == 8


def test_distributed_resume_is_exact_and_needs_the_same_number_of_processes(
        tiny: Path, train_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # With dropout, so that each rank's own random stream must come back from the checkpoint.
    # (An NF4 base works the same way, each rank quantizing its own copy; it is left out here
    # because bitsandbytes on the CPU would double this test's time.)
    run = tmp_path / "run"
    args = train_args(tiny, train_data, run, "--dropout", "0.1", "--grad-accum", "1", steps=4)
    torchrun("train.py", *args)
    first, first_log = load_file(run / "adapter/adapter_model.safetensors"), metrics(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]

    done = torchrun("train.py", *args, "--resume")  # steps 3 and 4 again, from the step-2 checkpoint
    assert "resumed from" in done.stdout and "at step 2" in done.stdout
    again = load_file(run / "adapter/adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert metrics(run) == first_log

    assert train_script.main(args + ["--resume"]) == 2  # one process cannot continue a two-process run
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err


# ------------------------------------------------------------------ augmentation and rating


def augment_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    # 8 texts, --batch-size 1: calls of 4 (humback.inference.call_size), one per rank; 6 new tokens
    # leave a mix of kept and dropped rows.
    return ["--model", str(tiny), "--unlabelled", UNLABELLED, "--n-texts", "8", "--seed", "0", "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "1", "--device", "cpu", "--no-progress", *extra]


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in read_lines(path)]


@pytest.fixture(scope="module")
def greedy_reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "augmented.jsonl"
    with one_thread():
        assert generate.main(augment_args(tiny, out, "--temperature", "0")) == 0
    assert read_lines(out) and read_lines(dropped_path(out))  # both kinds of row occur
    return out


# Run as the script of a torchrun: rank 1 dies right after writing its first batch.
DYING = """
import os, sys
sys.path.insert(0, {repo!r})
import humback.backtranslate, generate
if os.environ["RANK"] == "1":
    real = humback.backtranslate.append_jsonl
    def append_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("rank 1 dies after its first batch")
    humback.backtranslate.append_jsonl = append_then_die
sys.exit(generate.main(sys.argv[1:]))
"""


def test_two_ranks_augment_like_one_process_even_after_a_rank_dies(tiny: Path, greedy_reference: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "augmented.jsonl"
    args = augment_args(tiny, out, "--temperature", "0")
    script = tmp_path / "dying.py"
    script.write_text(DYING.format(repo=str(REPO)))
    died = torchrun(str(script), *args, check=False)
    assert died.returncode != 0 and "rank 1 dies" in died.stderr
    rank0, rank1 = part_path(out, 0, 2), part_path(out, 1, 2)
    # Rank 1's one call is the 4 texts rank 0 did not take. Its first write, durable, is exactly its
    # kept rows as one process writes them (or its dropped rows, if none was kept); then it died.
    theirs = set(ids(rank0) + ids(dropped_path(rank0)))
    assert len(theirs) == 4  # rank 0 finished its part
    kept = [line for line in read_lines(greedy_reference) if json.loads(line)["id"] not in theirs]
    dropped = [line for line in read_lines(dropped_path(greedy_reference)) if json.loads(line)["id"] not in theirs]
    assert len(kept) + len(dropped) == 4
    assert (read_lines(rank1), read_lines(dropped_path(rank1))) == ((kept, []) if kept else ([], dropped))
    assert not out.exists()  # nothing merged

    done = torchrun("generate.py", *args)  # the same command again: each rank resumes its part
    skipped = int(re.search(r"input=8 skipped_done=(\d+)", done.stdout).group(1))
    assert skipped >= 1  # what rank 1 wrote was not written again
    # Greedy: exactly the rows of one process, in the same order, byte for byte.
    assert read_lines(out) == read_lines(greedy_reference)
    assert read_lines(dropped_path(out)) == read_lines(dropped_path(greedy_reference))
    assert part_files(out) == [] and not dropped_path(rank1).exists()  # parts merged and removed


def test_two_ranks_sample_the_same_ids(tiny: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    with one_thread():
        assert generate.main(augment_args(tiny, one, "--temperature", "0.7")) == 0
    done = torchrun("generate.py", *augment_args(tiny, two, "--temperature", "0.7"))
    assert "input=8 skipped_done=0" in done.stdout  # the counts of both ranks, added up
    every = ids(two) + ids(dropped_path(two))
    assert len(every) == len(set(every)) == 8  # nothing lost, nothing twice
    assert set(every) == set(ids(one) + ids(dropped_path(one)))
    # Stronger, by design: a sampled prompt's randomness is its own (model.engine.row_seed),
    # whichever rank or batch it is in, so even the sampled rows are the same.
    assert read_lines(two) == read_lines(one)


def test_two_ranks_rate_like_one_process(tiny: Path, greedy_reference: Path, tmp_path: Path) -> None:
    def args(name: str) -> list[str]:
        return ["--model", str(tiny), "--pairs", str(greedy_reference), "--out", str(tmp_path / f"{name}.rated.jsonl"),
                "--curated", str(tmp_path / f"{name}.curated.jsonl"), "--threshold", "1", "--k-shot", "0",
                "--max-new-tokens", "4", "--batch-size", "1", "--device", "cpu", "--no-progress"]
    with one_thread():
        assert curate.main(args("one")) == 0
    done = torchrun("curate.py", *args("two"))
    assert "score histogram" in done.stdout
    for kind in ("rated", "curated"):
        assert read_lines(tmp_path / f"two.{kind}.jsonl") == read_lines(tmp_path / f"one.{kind}.jsonl")
    assert part_files(tmp_path / "two.rated.jsonl") == []


# ----------------------------------------------------------------- the pieces, without torchrun


def test_shard_batches_gives_every_batch_to_one_rank() -> None:
    items = list(range(11))
    shards = [shard_batches(items, 3, r, 2) for r in range(2)]
    assert shards == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]


def test_merge_parts_keeps_input_order_skips_done_ids_and_torn_lines(tmp_path: Path) -> None:
    out = tmp_path / "aug.jsonl"
    row = lambda i: json.dumps({"id": i, "instruction": "q", "output": "a"}) + "\n"  # noqa: E731
    out.write_text(row("a"))  # merged by an earlier, interrupted merge
    part_path(out, 0, 2).write_text(row("a") + row("c"))
    part_path(out, 1, 2).write_text(row("b") + row("d") + '{"id": "e", "instr')  # a torn last write
    dropped_path(part_path(out, 1, 2)).write_text(json.dumps({"id": "f", "reason": "empty"}) + "\n")
    part_path(out, 2, 4).write_text(row("g"))  # left by an earlier run with 4 ranks
    (tmp_path / "aug.rank0-of-2.dropped.jsonl.bak").write_text("not a part\n")
    assert merge_parts(out, ["a", "b", "c", "d", "e", "f", "g"]) == 4
    assert ids(out) == ["a", "b", "c", "d", "g"]
    assert ids(dropped_path(out)) == ["f"]
    assert part_files(out) == [] and (tmp_path / "aug.rank0-of-2.dropped.jsonl.bak").exists()
    assert merge_parts(out, ["a"]) == 0  # nothing left to merge


def test_a_rank_that_dropped_every_row_is_merged_and_counted_done(tmp_path: Path) -> None:
    """A rank whose rows were all dropped wrote only its sidecar: its rows still reach the merged
    dropped file (they were once left behind, with its part), and other ranks count them as done."""
    out = tmp_path / "aug.jsonl"
    row = lambda i: json.dumps({"id": i, "instruction": "q", "output": "a"}) + "\n"  # noqa: E731
    dropped = lambda i: json.dumps({"id": i, "reason": "too_short"}) + "\n"  # noqa: E731
    dropped_path(part_path(out, 0, 2)).write_text(dropped("a") + dropped("b"))  # rank 0: no kept row, no part file
    part_path(out, 1, 2).write_text(row("c"))
    dropped_path(part_path(out, 1, 2)).write_text(dropped("d"))
    assert part_files(out) == [part_path(out, 0, 2), part_path(out, 1, 2)]
    assert dropped_path(part_path(out, 0, 2)) in done_elsewhere(out, part_path(out, 1, 2))
    assert merge_parts(out, ["a", "b", "c", "d"]) == 1
    assert ids(out) == ["c"] and ids(dropped_path(out)) == ["a", "b", "d"]
    assert part_files(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["aug.dropped.jsonl", "aug.jsonl"]
