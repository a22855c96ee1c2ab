"""generate.py (prompt, self-augmentation, predictions) and curate.py end to end on a tiny model.

The scripts' ``main(argv)`` run in-process. The tiny model is random, so what it writes is
noise; these tests check the plumbing: files, fields, resuming, the printed report, errors.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import curate
import generate
from data.pairs import dropped_path, read_pairs
from humback.curation import print_report, read_rated
from tests.tiny import REPO, make_tiny

UNLABELLED = str(REPO / "data" / "demo" / "unlabelled.jsonl")
TEST_PROMPTS = str(REPO / "data" / "demo" / "test_prompts.jsonl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"), max_position_embeddings=4096)


def zero_adapter(folder: Path, direction: str, tag: str = "none", r: int = 2, b_std: float = 0.0) -> Path:
    """A PEFT-format LoRA adapter whose B matrices are zero (so it changes nothing; or random
    with ``b_std``), with the extra fields train.py records (direction, tag)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "v_proj"], "bias": "none", "direction": direction, "tag": tag}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    hidden, kv = 64, 2 * 16  # tiny_config: hidden 64, 2 kv heads of size 16
    tensors = {}
    for layer in range(2):
        for name, out_features in (("q_proj", hidden), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, r) * b_std
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def has_lora() -> bool:
    try:
        from lora.adapter import load_adapter  # noqa: F401
    except ImportError:
        return False
    return True


def test_prompt_mode_still_works(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--model", str(tiny), "--prompt", "Once upon a time", "--max-new-tokens", "4",
                          "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_augment_then_curate(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lora = has_lora()
    backward = ["--adapter", str(zero_adapter(tmp_path / "backward", "backward"))] if lora else []
    forward = ["--adapter", str(zero_adapter(tmp_path / "seed", "forward", tag="seed"))] if lora else []
    aug = tmp_path / "augmented.jsonl"
    argv = ["--model", str(tiny), *backward, "--unlabelled", UNLABELLED, "--n", "6", "--seed", "0",
            "--out", str(aug), "--max-new-tokens", "12", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert generate.main(argv) == 0
    out = capsys.readouterr().out
    assert "6 texts to backtranslate" in out and "input=6 skipped_done=0" in out
    pairs = read_pairs(aug)
    dropped = [json.loads(x) for x in dropped_path(aug).read_text().splitlines()] if dropped_path(aug).exists() else []
    assert len(pairs) + len(dropped) == 6 and len(pairs) >= 1
    demo_ids = {p.id for p in read_pairs(UNLABELLED)}
    assert all(p.instruction and p.id in demo_ids for p in pairs)
    assert out.count("- [demo-unlabelled-") == min(5, len(pairs))  # the examples
    # Running again does nothing new: everything is done.
    assert generate.main(argv) == 0
    assert "skipped_done=6 written=0" in capsys.readouterr().out and len(read_pairs(aug)) == len(pairs)

    rated, curated = tmp_path / "rated.jsonl", tmp_path / "curated.jsonl"
    argv = ["--model", str(tiny), *forward, "--pairs", str(aug), "--out", str(rated), "--curated", str(curated),
            "--threshold", "1", "--k-shot", "1", "--max-new-tokens", "8", "--batch-size", "4", "--device", "cpu",
            "--no-progress"]
    assert curate.main(argv) == 0
    out = capsys.readouterr().out
    rows = read_rated(rated)
    assert [r["id"] for r in rows] == [p.id for p in pairs]
    assert all(r["score"] in (1, 2, 3, 4, 5) and r["k"] == 1 for r in rows)  # the fallback scores them all
    assert "score histogram" in out and "5 | " in out and "1 | " in out
    assert "highest rated" in out and "lowest rated" in out and "from the log-prob fallback" in out
    assert f"valid: {len(rows)}/{len(rows)} (100.0%)" in out
    assert len(read_pairs(curated)) == len(rows)  # threshold 1 keeps every scored pair
    if lora:  # the seed adapter was trained with a tag, so the rating prompt starts with it
        assert "tag=seed" in out


def test_predict_writes_csv(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "predictions.csv"
    assert generate.main(["--model", str(tiny), "--predict", TEST_PROMPTS, "--out", str(out), "--max-new-tokens", "4",
                          "--device", "cpu", "--no-progress"]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and list(rows[0]) == ["id", "instruction", "output"]
    assert rows[0]["id"] == "demo-test-01" and rows[0]["instruction"]


def test_curate_by_likelihood(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"x{i}", "instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                             for i in range(5)))
    out, curated = tmp_path / "rated.jsonl", tmp_path / "curated.jsonl"
    assert curate.main(["--model", str(tiny), "--pairs", str(pairs), "--out", str(out), "--curated", str(curated),
                        "--method", "likelihood", "--threshold", "1", "--batch-size", "2", "--device", "cpu",
                        "--no-progress"]) == 0
    rows = read_rated(out)
    assert len(rows) == 5 and all(r["score_method"] == "likelihood" and 1 <= r["score"] <= 5 for r in rows)
    assert all(isinstance(r["information"], float) for r in rows)
    assert len(read_pairs(curated)) == 5
    assert "from the likelihood: 5" in capsys.readouterr().out


def test_predict_with_compile_merges_the_adapter_and_answers_the_same(tiny: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--compile folds the LoRA update into the weights and decodes with the compiled step: in
    fp32, greedy, the answers are the eager, unmerged ones token for token."""
    adapter = zero_adapter(tmp_path / "adapter", "forward", b_std=0.5)
    answers = []
    torch.compiler.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for extra in ([], ["--compile"]):
        out = tmp_path / f"predictions{len(extra)}.csv"
        assert generate.main(["--model", str(tiny), "--adapter", str(adapter), "--predict", TEST_PROMPTS, "--out",
                              str(out), "--max-new-tokens", "5", "--temperature", "0", "--dtype", "fp32",
                              "--batch-size", "4", "--device", "cpu", "--no-progress"] + extra) == 0
        with open(out, newline="", encoding="utf-8") as f:
            answers.append([row["output"] for row in csv.DictReader(f)])
    assert answers[0] == answers[1] and len(answers[0]) == 10
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "the compiled step must have run"
    assert "decoding eagerly" not in capsys.readouterr().err
    torch.compiler.reset()


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --prompt --unlabelled --predict is required"),
    (["--out", "x.jsonl"], "one of the arguments --prompt --unlabelled --predict is required"),  # no default source
    (["--prompt", "Hi", "--predict", TEST_PROMPTS], "argument --predict: not allowed with argument --prompt"),
])
def test_generate_needs_exactly_one_mode(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:  # argparse refuses it, before anything is loaded
        generate.main(argv)
    assert e.value.code == 2 and f"generate.py: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--predict", TEST_PROMPTS], "--predict needs --out"),
    (["--out", "x.jsonl", "--unlabelled", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--out", "x.jsonl", "--unlabelled", UNLABELLED, "--shard", "2/2"], "--shard"),
    (["--out", "x.jsonl", "--unlabelled", UNLABELLED, "--adapter", "no/such/adapter"], "no such folder"),
])
def test_generate_errors_are_one_line(argv: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_adapter_direction_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    forward = zero_adapter(tmp_path / "fwd", "forward")
    argv = ["--adapter", str(forward), "--unlabelled", UNLABELLED, "--out", str(tmp_path / "a.jsonl")]
    assert generate.main(argv) == 2
    assert "trained with --direction forward" in capsys.readouterr().err
    backward = zero_adapter(tmp_path / "bwd", "backward")
    assert curate.main(["--adapter", str(backward), "--pairs", UNLABELLED, "--out", str(tmp_path / "r.jsonl"),
                        "--curated", str(tmp_path / "c.jsonl")]) == 2
    assert "needs the forward model" in capsys.readouterr().err


def test_curate_refuses_unlabelled_pairs(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert curate.main(["--model", str(tiny), "--pairs", UNLABELLED, "--out", str(tmp_path / "r.jsonl"),
                        "--curated", str(tmp_path / "c.jsonl"), "--device", "cpu"]) == 2
    assert "rating needs both an instruction and an output" in capsys.readouterr().err


def test_labelled_source_keeps_the_human_instruction(tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    seed = str(REPO / "data" / "demo" / "seed.jsonl")
    out = tmp_path / "aug.jsonl"
    assert generate.main(["--model", str(tiny), "--unlabelled", seed, "--n", "2", "--out", str(out),
                          "--max-new-tokens", "12", "--device", "cpu", "--no-progress"]) == 0
    humans = {p.id: p.instruction for p in read_pairs(seed)}
    written = read_pairs(out) if out.exists() else []
    for p in written:  # the human instruction rides along in meta, for comparison
        assert p.meta["human_instruction"] == humans[p.id] != p.instruction
    assert "human's instruction:" in capsys.readouterr().out or not written


def test_report_says_what_share_of_each_source_was_kept(capsys: pytest.CaptureFixture[str]) -> None:
    from humback.curation import select
    rows = [dict(id=f"{src}-{i}", instruction="q", output="o", source=src, score=score, score_method="text")
            for src, scores in (("lima", [5, 5, 1, 1]), ("web", [5, 1, 1, 1])) for i, score in enumerate(scores)]
    print_report(rows, 5, select(rows, 5))
    assert "kept by source: lima 2/4 (50%), web 1/4 (25%)" in capsys.readouterr().out
    print_report(rows[:4], 5, select(rows[:4], 5))  # one source: no such line
    assert "kept by source" not in capsys.readouterr().out
