"""Bad flag values are refused while the flags are parsed: exit code 2, one line naming the flag,
no model loaded and nothing written. One case per kind of bad value (negative, zero, NaN, out of
range) for every script, and for the flags the pipeline passes on (--*-args)."""
from __future__ import annotations

import pytest

import curate
import evaluate
import generate
import model
import model.load
import pipeline
import train

SCRIPTS = {"train.py": train, "generate.py": generate, "curate.py": curate, "evaluate.py": evaluate,
           "pipeline.py": pipeline}
# What each script needs besides the bad flag, so that the bad value is the only thing wrong.
REQUIRED = {"train.py": ["--data", "pairs.jsonl"], "generate.py": ["--prompt", "Hello"],
            "curate.py": ["--pairs", "a.jsonl", "--out", "b.jsonl", "--curated", "c.jsonl"],
            "evaluate.py": ["--out", "eval", "--rater", "base"], "pipeline.py": ["--workdir", "WORK"]}

CASES = [  # (script, flags, the flag the message must name), by kind of bad value
    # negative
    ("train.py", ["--batch-size", "-4"], "--batch-size"),
    ("train.py", ["--max-steps", "-2"], "--max-steps"),
    ("train.py", ["--save-every", "-1"], "--save-every"),
    ("generate.py", ["--max-new-tokens", "-5"], "--max-new-tokens"),
    ("generate.py", ["--temperature", "-1"], "--temperature"),
    ("generate.py", ["--temperature", "0.7", "--top-p", "-1"], "--top-p"),
    ("curate.py", ["--max-new-tokens", "-1"], "--max-new-tokens"),
    ("evaluate.py", ["--rating-tokens", "-1"], "--rating-tokens"),
    ("pipeline.py", ["--n-unlabelled", "-1"], "--n-unlabelled"),
    # zero
    ("train.py", ["--grad-accum", "0"], "--grad-accum"),
    ("train.py", ["--lr", "0"], "--lr"),
    ("generate.py", ["--batch-size", "0"], "--batch-size"),
    ("curate.py", ["--batch-size", "0"], "--batch-size"),
    ("evaluate.py", ["--n", "0"], "--n"),
    ("pipeline.py", ["--n-seed", "0"], "--n-seed"),
    # NaN (and inf)
    ("train.py", ["--lr", "nan"], "--lr"),
    ("generate.py", ["--temperature", "nan"], "--temperature"),
    ("curate.py", ["--temperature", "nan"], "--temperature"),
    ("evaluate.py", ["--top-p", "nan"], "--top-p"),
    ("train.py", ["--clip", "inf"], "--clip"),
    # out of range
    ("train.py", ["--eval-frac", "1.5"], "--eval-frac"),
    ("train.py", ["--dropout", "1"], "--dropout"),
    ("generate.py", ["--top-p", "2"], "--top-p"),
    ("curate.py", ["--top-p", "2"], "--top-p"),
    ("curate.py", ["--k-shot", "9"], "--k-shot"),
    ("evaluate.py", ["--top-p", "1.5"], "--top-p"),
    ("pipeline.py", ["--k-shot", "7"], "--k-shot"),
    # not a number at all
    ("train.py", ["--epochs", "two"], "--epochs"),
    # the flags the pipeline passes on, checked by the command's own parser before the first stage
    ("pipeline.py", ["--train-args", "--batch-size -4"], "--batch-size"),
    ("pipeline.py", ["--train-args", "--grad-accum 0"], "--grad-accum"),
    ("pipeline.py", ["--augment-args", "--top-p 2"], "--top-p"),
    ("pipeline.py", ["--curate-args", "--temperature nan"], "--temperature"),
    ("pipeline.py", ["--eval-args", "--n 0"], "--n"),
    ("pipeline.py", ["--ablation", "--ablation-train-args", "--max-steps -2"], "--max-steps"),
    ("pipeline.py", ["--train-args=--no-such-flag"], "--no-such-flag"),
]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: a bad flag must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(model, "load_model", refuse)
    monkeypatch.setattr(model.load, "load_model", refuse)


@pytest.mark.parametrize("script, flags, named", CASES, ids=[f"{s}:{' '.join(f)}" for s, f, _ in CASES])
def test_a_bad_value_is_one_line_and_exit_2(script, flags, named, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script].main(REQUIRED[script] + flags)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{script}: error: ") and named in err, err
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written (pipeline.py: not even WORKDIR)


@pytest.mark.parametrize("script, flags", [
    ("train.py", ["--batch-size", "1", "--grad-accum", "1", "--max-steps", "1", "--save-every", "0",
                  "--eval-frac", "0", "--dropout", "0", "--warmup-steps", "0", "--weight-decay", "0"]),
    ("generate.py", ["--temperature", "0", "--top-p", "1", "--max-new-tokens", "1", "--batch-size", "1"]),
    ("curate.py", ["--k-shot", "0", "--top-p", "0.9", "--temperature", "0.7"]),
])
def test_the_edges_of_each_range_are_accepted(script, flags):
    from humback import flags as parsers
    builder = {"train.py": parsers.train_parser, "generate.py": parsers.generate_parser,
               "curate.py": parsers.curate_parser}[script]
    builder().parse_args(REQUIRED[script] + flags)  # no SystemExit
