"""pipeline.py end to end on a tiny random Llama with the committed demo data (CPU, ~1 minute).

Every stage runs and writes what it promises; a re-run does nothing; --from curate redoes only
curate and what follows; an augmentation killed mid-way resumes with no row lost or duplicated;
a hub push with the hub unreachable leaves a complete upload folder and fails in one line.
"""
from __future__ import annotations

import csv
import json

import pytest

import model.sampling
import pipeline
from data import DEMO_DIR
from data.pairs import dropped_path, read_jsonl, read_pairs
from humback.training import answer_tokens
from tests.tiny import make_tiny

FAST = ["--n-unlabelled", "8", "--train-args=--max-steps 2", "--augment-args=--batch-size 3 --max-new-tokens 12",
        "--curate-args=--max-new-tokens 8 --batch-size 4", "--no-progress",
        "--eval-args=--n 4 --instruction-tokens 6 --rating-tokens 6 --answer-tokens 6 --no-plots"]
DEMO_TEXTS, DEMO_SEED = str(DEMO_DIR / "unlabelled.jsonl"), str(DEMO_DIR / "seed.jsonl")
STAGES = {"data", "backward", "m0", "augment", "curate", "forward", "respond", "evaluate"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("tiny"), std=0.1, hidden_size=64, intermediate_size=128))


def manifests(work):
    return {d.name: json.loads((d / "manifest.json").read_text())["finished"] + str((d / "manifest.json").stat().st_mtime_ns)
            for d in work.iterdir() if (d / "manifest.json").exists()}


def test_pipeline_runs_caches_and_redoes_from_a_stage(tiny, tmp_path, capsys):
    work = tmp_path / "run"
    assert pipeline.main(["--workdir", str(work), "--model", tiny] + FAST) == 0
    out = capsys.readouterr().out
    assert set(manifests(work)) == STAGES
    augmented = read_jsonl(work / "augment/augmented.jsonl")
    sidecar = dropped_path(work / "augment/augmented.jsonl")
    dropped = read_jsonl(sidecar) if sidecar.exists() else []
    assert len(augmented) + len(dropped) == 8
    assert all({"id", "instruction", "output", "source"} <= set(r) for r in augmented)
    rated = read_jsonl(work / "curate/rated.jsonl")
    assert len(rated) == len(augmented)
    assert all(1 <= r["score"] <= 5 and r["score_method"] in ("text", "logprob") for r in rated)
    with open(work / "respond/responses.csv", newline="") as f:
        responses = list(csv.DictReader(f))
    assert len(responses) == 5 and set(responses[0]) == {"id", "instruction", "output"}
    assert "example responses" in out and "highest rated" in out and "lowest rated" in out
    assert (work / "forward/adapter/adapter_config.json").exists()

    before = manifests(work)
    assert pipeline.main(["--workdir", str(work), "--model", tiny] + FAST) == 0
    assert manifests(work) == before, "a re-run must do nothing"
    assert capsys.readouterr().out.count("up to date, skipped") == len(STAGES)

    assert pipeline.main(["--workdir", str(work), "--model", tiny, "--from", "curate"] + FAST) == 0
    after = manifests(work)
    for name in ("data", "backward", "m0", "augment"):
        assert after[name] == before[name], name
    for name in ("curate", "forward", "respond", "evaluate"):
        assert after[name] != before[name], name
    report = json.loads((work / "evaluate/eval.json").read_text())
    assert [r["model"] for r in report["forward"]] == ["base", "m0", "forward"]
    assert report["backward"] and report["rater"] and report["heldout"]["n"] == 4

    # --rater-model: another model alone rates (no M0 adapter), and the evaluate stage measures that rater
    other = str(make_tiny(tmp_path / "rater", seed=5, hidden_size=64, intermediate_size=128))
    capsys.readouterr()
    assert pipeline.main(["--workdir", str(work), "--model", tiny, "--rater-model", other] + FAST) == 0
    printed = capsys.readouterr().out
    curate_cmd = next(line for line in printed.splitlines() if line.startswith("$ python curate.py"))
    assert f"--model {other}" in curate_cmd and "--adapter" not in curate_cmd
    rerun = manifests(work)
    assert all(rerun[n] == after[n] for n in ("data", "backward", "m0", "augment"))
    assert rerun["curate"] != after["curate"] and rerun["evaluate"] != after["evaluate"]
    report = json.loads((work / "evaluate/eval.json").read_text())
    assert report["settings"]["rater_model"] == other and [r["model"] for r in report["rater"]] == ["base"]

    # a run from before the rater read its own chat template recorded no rater_prompt: its curate and
    # evaluate stages rated with the old prompt, so they run again; the stages before them are kept
    for name in ("curate", "evaluate"):
        path = work / name / "manifest.json"
        saved = json.loads(path.read_text())
        del saved["config"]["rater_prompt"]
        path.write_text(json.dumps(saved))
    old = manifests(work)
    assert pipeline.main(["--workdir", str(work), "--model", tiny, "--rater-model", other] + FAST) == 0
    again = manifests(work)
    assert all(again[n] == old[n] for n in ("data", "backward", "m0", "augment"))
    assert again["curate"] != old["curate"] and again["evaluate"] != old["evaluate"]


def test_ablation_trains_the_three_sets_and_compares_them(tiny, tmp_path, capsys):
    work = tmp_path / "run"
    # a second source in the pool, for the control (e) at the end: web pages of two demo answers each
    # (the web reader keeps passages of 600+ characters only)
    answers = [p.output.replace("\n", " ") for p in read_pairs(DEMO_SEED)]
    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps({"text": " ".join(answers[i:i + 2])}) + "\n" for i in range(0, len(answers), 2)))
    argv = ["--workdir", str(work), "--model", tiny, "--threshold", "1", "--ablation", "--ablation-draws", "2",
            "--unlabelled", DEMO_TEXTS, f"web:{web}"] + FAST
    assert pipeline.main(argv) == 0
    out = capsys.readouterr().out
    curated = read_jsonl(work / "curate/curated.jsonl")
    draws = ("ablate-random", "ablate-random-2")
    sets = {name: read_jsonl(work / name / "data/train.jsonl") for name in ("ablate-curated", *draws, "ablate-all")}
    augmented = read_jsonl(work / "augment/augmented.jsonl")
    assert {k: len(v) for k, v in sets.items()} == {"ablate-curated": len(curated), "ablate-random": len(curated),
                                                    "ablate-random-2": len(curated), "ablate-all": len(augmented)}
    # each draw samples and trains with its own seed (here all pairs are rated >= 1, so both draw all of them)
    assert [json.loads((work / d / "train_config.json").read_text())["seed"] for d in draws] == [0, 1]
    assert all("tag" not in r.get("meta", {}) for r in read_jsonl(work / "ablate-all/data/train.jsonl"))
    report = json.loads((work / "ablation/eval.json").read_text())
    assert [r["model"] for r in report["forward"]] == ["base", "ablate-curated", *draws, "ablate-all", "m0"]
    table = (work / "ablation/ablation.md").read_text()
    assert "(a) curated" in table and "(d) seed only (M0" in table and "Quality vs quantity" in out
    assert "(b) random, draw 2" in table
    assert "texts from" in table and "demo" in table and "answer tokens per epoch" in table  # what each set holds
    assert "(a) - (b), the paper's claim, over 2 random draws of (b)" in table and "Verdict: " in table  # both draws
    cfg = json.loads((work / "ablate-all/train_config.json").read_text())
    # (c): its pairs, the answer tokens of one pass over its split, and those all its steps saw
    assert f"| {len(augmented)} | {cfg['target_tokens']} | {cfg['target_tokens_trained']} |" in table
    rows = read_jsonl(work / "ablation/forward_ablate-curated.jsonl")
    assert all(r["reference_tokens"] > 0 and r["reference_nll_sum"] > 0 for r in rows)

    # A different curated set (as another rater would give) retrains (a) and every draw of (b), never (c).
    before = manifests(work)
    lines = (work / "curate/curated.jsonl").read_text().splitlines(keepends=True)
    (work / "curate/curated.jsonl").write_text("".join(lines[:4]))
    assert pipeline.main(argv) == 0
    after = manifests(work)
    assert after["ablate-all"] == before["ablate-all"] and after["curate"] == before["curate"]
    assert all(after[n] != before[n] for n in ("ablate-curated", *draws))
    ids = [[r["id"] for r in read_jsonl(work / d / "data/train.jsonl")] for d in draws]
    assert [len(x) for x in ids] == [4, 4] and set(ids[0]) != set(ids[1])  # each draw samples with its own seed
    # draw 1 keeps the stage name and config it had before --ablation-draws, so older runs stay cached
    config = json.loads((work / "ablate-random/manifest.json").read_text())["config"]
    assert sorted(config) == ["model", "quantize", "seed", "set", "train"] and (config["set"], config["seed"]) == \
        ("random", 0)

    # --ablation-match tokens: (b) now matches (a)'s answer tokens, not its pair count; (a) and (c) are kept
    assert pipeline.main(argv + ["--ablation-match", "tokens"]) == 0
    again = manifests(work)
    assert again["ablate-curated"] == after["ablate-curated"] and again["ablate-all"] == after["ablate-all"]
    assert json.loads((work / "ablate-random-2/manifest.json").read_text())["config"]["match"] == "tokens"
    # counted as train.py counts them: its own target_tokens (these sets are too small for an eval split)
    count = answer_tokens(["--model", tiny, "--data", "-", "--direction", "forward", "--tag", "seed",
                           "--max-len", "384"])
    trained = {d: json.loads((work / d / "train_config.json").read_text())["target_tokens"]
               for d in ("ablate-curated", *draws)}
    for d in ("ablate-curated", *draws):
        sizes = [count(p) for p in read_pairs(work / d / "data/train.jsonl")]
        assert sum(sizes) == trained[d]
        if d != "ablate-curated":  # each draw reaches (a)'s answer tokens, and would not without its last pair
            assert sum(sizes) >= trained["ablate-curated"] > sum(sizes) - max(sizes)
    assert "(b) random, as many answer tokens as (a), uncurated, draw 1" in (work / "ablation/ablation.md").read_text()

    # --ablation-oracle SOURCE adds the control (e): as (b), from SOURCE's texts only; nothing else retrains
    assert pipeline.main(argv + ["--ablation-match", "tokens", "--ablation-oracle", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no pair comes from source 'nosuch' (its sources: " in err and "web " in err and "demo " in err
    assert pipeline.main(argv + ["--ablation-match", "tokens", "--ablation-oracle", "demo"]) == 0
    final = manifests(work)
    assert all(final[n] == again[n] for n in ("ablate-curated", *draws, "ablate-all"))
    oracle = read_pairs(work / "ablate-oracle/data/train.jsonl")
    assert {p.source for p in oracle} == {"demo"} and {p.source for p in read_pairs(work / "augment/augmented.jsonl")} \
        == {"demo", "web"} and sum(map(count, oracle)) >= trained["ablate-curated"]
    assert json.loads((work / "ablate-oracle/manifest.json").read_text())["config"]["source"] == "demo"
    report = json.loads((work / "ablation/eval.json").read_text())
    assert [r["model"] for r in report["forward"]] == ["base", "ablate-curated", *draws, "ablate-oracle",
                                                      "ablate-all", "m0"]
    table = (work / "ablation/ablation.md").read_text()
    assert "(e) control: random, as many answer tokens as (a), demo texts only" in table
    assert "(e) - (b), the control, demo texts only, over 2 random draws" in table


def test_several_unlabelled_sources_are_sampled_each_and_pooled(tiny, tmp_path, capsys):
    work = tmp_path / "run"
    argv = ["--workdir", str(work), "--model", tiny, "--until", "data", "--unlabelled", DEMO_TEXTS, DEMO_SEED] + FAST
    assert pipeline.main(argv) == 0
    rows = read_jsonl(work / "data/unlabelled.jsonl")
    assert len(rows) == 16 and [r["instruction"] for r in rows] == [""] * 16  # 8 (--n-unlabelled) from each
    assert sorted(r["id"].split("-")[1] for r in rows) == ["seed"] * 8 + ["unlabelled"] * 8
    # the same source twice would give every id twice, and augmentation resumes by id
    argv = ["--workdir", str(tmp_path / "twice"), "--model", tiny, "--until", "data",
            "--unlabelled", DEMO_TEXTS, DEMO_TEXTS] + FAST
    assert pipeline.main(argv) == 2
    assert "duplicate ids in the unlabelled texts of" in capsys.readouterr().err
    assert not (tmp_path / "twice/data/unlabelled.jsonl").exists()  # refused before anything is written
    assert json.loads((work / "preset.json").read_text())["unlabelled"] == [DEMO_TEXTS, DEMO_SEED]


def test_killed_augmentation_resumes_without_loss_or_duplicates(tiny, tmp_path, monkeypatch):
    work = tmp_path / "run"
    real = model.sampling.generate
    calls = {"n": 0}

    def dies_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(model.sampling, "generate", dies_on_second_batch)
    # --batch-size 1: calls of 4 prompts (humback.inference.call_size), so 8 texts take two
    one_per_call = FAST + ["--augment-args=--batch-size 1 --max-new-tokens 12"]
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(["--workdir", str(work), "--model", tiny, "--until", "augment"] + one_per_call)
    partial = read_jsonl(work / "augment/augmented.jsonl")
    assert 0 < len(partial) <= 4 and not (work / "augment/manifest.json").exists()
    monkeypatch.setattr(model.sampling, "generate", real)
    assert pipeline.main(["--workdir", str(work), "--model", tiny, "--until", "augment"] + one_per_call) == 0
    dropped_file = dropped_path(work / "augment/augmented.jsonl")
    ids = [r["id"] for r in read_jsonl(work / "augment/augmented.jsonl")] + \
        ([r["id"] for r in read_jsonl(dropped_file)] if dropped_file.exists() else [])
    expected = [r["id"] for r in read_jsonl(work / "data/unlabelled.jsonl")]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids) == 8


def test_push_offline_keeps_a_complete_upload_folder_and_fails_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    work = tmp_path / "run"
    assert pipeline.main(["--workdir", str(work), "--model", tiny] + FAST) == 0
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # every stage is cached: this run only pushes
    rc = pipeline.main(["--workdir", str(work), "--model", tiny, "--push-to-hub", "someone/humback-test"] + FAST)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error: ") and "someone/humback-test-m1" in err
    assert "the upload folder is complete at" in err
    m1 = work / "hub/m1"
    assert {p.name for p in m1.iterdir()} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    card = (m1 / "README.md").read_text()
    assert "r=8" in card and "PeftModel.from_pretrained" in card and tiny in card
    ds = work / "hub/curated"
    assert (ds / "README.md").exists() and (ds / "data/train.jsonl").exists()
    assert "Score histogram" in (ds / "README.md").read_text()


def test_stage_flags_that_cannot_work_fail_in_one_line(tiny, tmp_path, capsys):
    work = tmp_path / "run"
    assert pipeline.main(["--workdir", str(work), "--model", tiny, "--ablation", "--heldout", "none"] + FAST) == 2
    assert "--ablation compares models on held-out pairs" in capsys.readouterr().err
    assert pipeline.main(["--workdir", str(work), "--model", tiny, "--heldout", "none", "--until", "evaluate"]
                         + FAST) == 2
    err = capsys.readouterr().err
    assert "--until evaluate: this run has no such stage" in err and len(err.strip().splitlines()) == 1


def test_a_flag_a_script_rejects_ends_the_run_naming_that_script(tiny, tmp_path, capsys):
    """Checked by the script's own parser before the first stage: nothing is written."""
    work = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--workdir", str(work), "--model", tiny, "--train-args=--no-such-flag"] + FAST[:2])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pipeline.py: error: --train-args: train.py: unrecognized arguments: --no-such-flag" in err
    # --help among a script's flags would only print its help: refused too, saying so
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--workdir", str(work), "--model", tiny, "--train-args=--help"] + FAST[:2])
    assert e.value.code == 2
    assert "--train-args: --help is not a flag to pass on to train.py" in capsys.readouterr().err
    assert not work.exists()


def test_ablation_draws_flag_is_checked_before_anything_is_written(tmp_path, capsys):
    for extra in (["--ablation", "--ablation-draws", "0"], ["--ablation-draws", "3"], ["--ablation-oracle", "lima"],
                  ["--preset", "paper", "--rater-model", "some/chat-model"],
                  ["--preset", "assignment", "--iterations", "2"]):
        with pytest.raises(SystemExit) as e:
            pipeline.main(["--workdir", str(tmp_path / "run")] + extra)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --ablation-draws: expected an integer >= 1, got 0" in err and "--ablation-draws and --ablation-match shape the ablation: add --ablation" in err
    assert "--ablation-oracle adds a control to the ablation: add --ablation" in err
    assert "iteration 2 would repeat iteration 1 (the paper preset has 2): add --iterations 1" in err
    assert ("--iterations 2 rates with M0, then M1, but the assignment preset rates with meta-llama/Llama-2-7b-chat-hf"
            " alone, so iteration 2 would repeat iteration 1: add --rater-model m0") in err
    assert not (tmp_path / "run").exists()
