"""evaluate.py end to end on a tiny random Llama (whose outputs are noise: these tests check the
plumbing and the files), and the pieces of its report (humback/evaluation.py, humback/eval_report.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import evaluate
from humback.eval_report import markdown_table, plot
from humback.evaluation import labels_for
from humback.inference import adapter_loaded
from tests.humback.test_measures import ANSWERS, QUESTIONS
from tests.tiny import make_tiny


def test_markdown_table() -> None:
    table = markdown_table([dict(model="base", bleu=1.234, n=3), dict(model="m1", bleu=None, n=3)],
                           [("model", "model", ""), ("bleu", "BLEU", ".1f"), ("n", "n", "")])
    assert table.splitlines() == ["| model | BLEU | n |", "|---|---:|---:|", "| base | 1.2 | 3 |", "| m1 | - | 3 |"]


# ---------------------------------------------------------------------- evaluate.py end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"), max_position_embeddings=4096)


def random_adapter(folder: Path, direction: str, tag: str = "none", data: str | None = None, seed: int = 1) -> Path:
    """A PEFT-format LoRA adapter with random (non-zero) A and B, so it changes the model, plus the
    fields train.py records (direction, tag, data); metrics.jsonl beside it, as train.py writes."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "v_proj"], "bias": "none", "direction": direction, "tag": tag,
              **({"data": data} if data else {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for name, out_features in (("q_proj", 64), ("v_proj", 32)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(2, 64, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, 2, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, **({"eval_loss": 3.1 - 0.1 * s} if s % 2 == 0 else {})}
            for s in range(1, 7)]
    (folder.parent / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def setup(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    heldout = root / "heldout.jsonl"  # guanaco's own format, like the default eval split
    heldout.write_text("".join(json.dumps({"text": f"### Human: {q}### Assistant: {a}"}) + "\n"
                               for q, a in zip(QUESTIONS, ANSWERS)))
    train = root / "train.jsonl"  # the adapters "trained" on the first held-out question: it must be dropped
    train.write_text(json.dumps({"instruction": QUESTIONS[0], "output": "An answer of its own."}) + "\n")
    return dict(root=root, heldout=heldout, tiny=tiny,
                backward=random_adapter(root / "backward" / "adapter", "backward", data=str(train)),
                m0=random_adapter(root / "m0" / "adapter", "forward", "seed", data=str(train), seed=2),
                m1=random_adapter(root / "m1" / "adapter", "forward", "seed", seed=3))


SMALL = ["--device", "cpu", "--k-shot", "0", "--instruction-tokens", "6", "--rating-tokens", "6",
         "--answer-tokens", "6", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def full_run(setup: dict[str, Path]) -> tuple[int, Path, str]:
    out = setup["root"] / "out"
    argv = ["--model", str(setup["tiny"]), "--backward", str(setup["backward"]), "--rater", str(setup["m0"]),
            "--forward", str(setup["m0"]), "--heldout", str(setup["heldout"]), "--n", "3", "--out", str(out), *SMALL]
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = evaluate.main(argv)
    return rc, out, buf.getvalue()


def test_end_to_end_writes_the_tables(full_run: tuple[int, Path, str]) -> None:
    rc, out, printed = full_run
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["heldout"]["n"] == 3 and sum(report["heldout"]["dropped_seen"].values()) == 1
    assert [r["model"] for r in report["backward"]] == ["base", "backward"]
    for row in report["backward"]:
        assert {"bleu", "rouge_l", "n", "empty"} <= set(row) and 0 <= row["bleu"] <= 100 and 0 <= row["rouge_l"] <= 1
    assert [r["model"] for r in report["rater"]] == ["base", "m0"]
    for row in report["rater"]:
        assert {"auc", "auc_expected", "valid_score_rate", "histogram_real", "histogram_mismatched"} <= set(row)
        assert 0 <= row["auc"] <= 1 and 0 <= row["auc_expected"] <= 1
        assert row["n_real"] == row["n_mismatched"] == 3 and row["tag"] == "seed"
        assert sum(row["histogram_real"].values()) == 3  # every row scored (text or fallback)
    base, m0 = report["forward"]
    assert (base["model"], m0["model"]) == ("base", "m0") and base["nll"] != m0["nll"]
    assert {"nll", "perplexity", "tokens"} <= set(base) and "wins" not in base
    assert m0["wins"] + m0["losses"] + m0["ties"] == 3 and {"win_rate", "tie_rate", "first_position_rate"} <= set(m0)

    md = (out / "eval.md").read_text()
    for heading in ("## Backward model", "## Rater", "## Forward model", "| model | pairs | BLEU | ROUGE-L"):
        assert heading in md
    assert "| base |" in printed and "AUC (expected score)" in printed
    for name in ("backward_base", "backward_backward", "rater_base", "rater_m0", "forward_base", "forward_m0"):
        assert (out / f"{name}.jsonl").stat().st_size > 0
    item = json.loads((out / "forward_m0.jsonl").read_text().splitlines()[0])
    assert {"instruction", "reference", "answer", "base_answer", "outcome"} <= set(item)


def test_end_to_end_plots_when_matplotlib_is_there(full_run: tuple[int, Path, str]) -> None:
    pytest.importorskip("matplotlib")
    _, out, _ = full_run
    assert (out / "rater_scores.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0


def test_forward_bars_without_a_judge_are_one_panel(tmp_path: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    forward = [{"model": "base", "nll": 2.384}, {"model": "ablate-curated", "nll": 2.333},
               {"model": "ablate-random", "nll": 2.330}]
    assert plot({"forward": forward}, tmp_path) == ["forward_nll.png"]
    no_judge = plt.imread(tmp_path / "forward_nll.png").shape
    judged = [dict(r, win_rate=0.5, win_rate_ties_half=0.5) for r in forward]
    assert plot({"forward": judged}, tmp_path) == ["forward_nll.png"]
    assert plt.imread(tmp_path / "forward_nll.png").shape[1] == 2 * no_judge[1]  # a second panel only when judged


def test_several_forward_adapters_in_one_table(setup: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # plots are optional: without matplotlib, none
    argv = ["--model", str(setup["tiny"]), "--forward", str(setup["m0"]), "--forward", str(setup["m1"]),
            "--rater", "base", "--no-judge", "--heldout", str(setup["heldout"]), "--n", "2",
            "--out", str(tmp_path), *SMALL]
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [r["model"] for r in report["forward"]] == ["base", "m0", "m1"]
    assert all("wins" not in r for r in report["forward"]) and report["settings"]["judge"] == "none"
    assert [r["model"] for r in report["rater"]] == ["base"] and report["plots"] == []
    assert not list(tmp_path.glob("*.png"))


def test_adapter_loaded_restores_the_base(setup: dict[str, Path]) -> None:
    from lora.inject import lora_layers
    from model.load import load_model
    model, tok = load_model(setup["tiny"], device="cpu")
    ids = torch.tensor([tok.encode("The capital of France is", bos=True)])
    before = model(ids)
    with adapter_loaded(model, str(setup["m1"])):
        assert any(True for _ in lora_layers(model))
        assert not torch.allclose(model(ids), before)
    assert not any(True for _ in lora_layers(model)) and torch.equal(model(ids), before)


def test_labels() -> None:
    assert labels_for([None, "runs/a/m0/adapter", "runs/b/m0/adapter", "x/final"]) == \
        ["base", "m0", "m0-2", "final"]


def test_usage_errors(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--out", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    # A forward adapter given as the backward model: refused before anything is loaded.
    assert evaluate.main(["--backward", str(setup["m0"]), "--out", str(tmp_path)]) == 2
    assert "needs the backward model" in capsys.readouterr().err
    assert evaluate.main(["--forward", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_rater_model_rates_with_another_model(setup: dict[str, Path], tmp_path: Path) -> None:
    # "a stronger rater": --rater-model loads a second model for --rater only. Its rows must be the
    # ones that model gives when it is --model itself, and not the ones --model gives.
    from tests.tiny import make_tiny
    other = make_tiny(tmp_path / "other", seed=7)
    common = ["--rater", "base", "--heldout", str(setup["heldout"]), "--n", "3", *SMALL]

    def rater_rows(out: Path, *model_flags: str) -> list[dict]:
        assert evaluate.main([*model_flags, *common, "--out", str(out)]) == 0
        return [json.loads(line) for line in (out / "rater_base.jsonl").read_text().splitlines()]
    via_flag = rater_rows(tmp_path / "flag", "--model", str(setup["tiny"]), "--rater-model", str(other))
    assert via_flag == rater_rows(tmp_path / "direct", "--model", str(other))
    assert via_flag != rater_rows(tmp_path / "own", "--model", str(setup["tiny"]))
    report = json.loads((tmp_path / "flag" / "eval.json").read_text())
    assert report["settings"]["rater_model"] == str(other)
    assert f"## Rater: real vs mismatched pairs (rater model: {other})" in (tmp_path / "flag" / "eval.md").read_text()


def test_rater_model_without_rater_is_refused(setup: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--model", str(setup["tiny"]), "--rater-model", str(setup["tiny"]), "--forward",
                          str(setup["m0"]), "--out", str(tmp_path), *SMALL]) == 2
    assert "--rater-model names the model --rater evaluates: add --rater base" in capsys.readouterr().err
