"""humback.ablation on hand-made folders: which pairs each set gets, and what ablation.md concludes
from per-answer NLLs whose comparison is known in advance."""
from __future__ import annotations

import json

import pytest

from humback.ablation import ablation_set, ablation_table


def test_ablation_with_an_empty_curated_set_names_the_file(tmp_path):
    from data.pairs import DataError
    empty = tmp_path / "curated.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"curated\.jsonl: the curated set is empty"):
        ablation_set("random", tmp_path / "augmented.jsonl", empty, seed=0)


def test_ablation_draws_differ_by_seed(tmp_path):
    from data.pairs import Pair, write_jsonl_atomic
    write_jsonl_atomic(tmp_path / "augmented.jsonl", [Pair(f"p{i}", "q", "o", "web") for i in range(20)])
    write_jsonl_atomic(tmp_path / "curated.jsonl", [Pair(f"p{i}", "q", "o", "web") for i in range(5)])
    draws = [{p.id for p in ablation_set("random", tmp_path / "augmented.jsonl", tmp_path / "curated.jsonl",
                                                  seed)} for seed in (0, 1, 0)]
    assert len(draws[0]) == 5 and draws[0] != draws[1] and draws[0] == draws[2]


def _ablation_dir(tmp_path, curated, *random, oracle=None):
    """A hand-made ablation folder: eval.json plus per-answer NLLs for (a), each draw of (b) and
    optionally the control (e), given as {id: (summed -log p, tokens)}."""
    from data.pairs import Pair, write_jsonl_atomic
    out = tmp_path / "ablation"
    out.mkdir(parents=True)
    adapters = []
    names = ["ablate-curated"] + ["ablate-random" + (f"-{k + 1}" if k else "") for k in range(len(random))]
    names += ["ablate-oracle"] if oracle is not None else []
    for name in names:
        source = "lima" if name == "ablate-curated" else "web"
        write_jsonl_atomic(tmp_path / name / "data/train.jsonl", [Pair(f"{name}-{i}", "q", "o", source) for i in range(3)])
        (tmp_path / name / "train_config.json").write_text(json.dumps({"target_tokens": 123,
                                                                       "target_tokens_trained": 369}))
        adapters.append(tmp_path / name / "adapter")
    (out / "eval.json").write_text(json.dumps({
        "forward": [{"model": "base", "nll": 2.5}] + [{"model": n, "nll": 2.0} for n in names],
        "heldout": {"n": 3, "spec": "held.jsonl"}, "settings": {"judge": "none"}}))
    for name, per in zip(names, (curated, *random, oracle)):
        with open(out / f"forward_{name}.jsonl", "w") as f:
            for i, (s, t) in per.items():
                f.write(json.dumps({"id": i, "reference_nll_sum": s, "reference_tokens": t}) + "\n")
    return out / "eval.json", adapters


def test_ablation_table_pairs_answers_by_id_and_reports_the_gap(tmp_path):
    # (a) is 1 nat/token better on every answer; (b)'s rows come in another order
    eval_json, adapters = _ablation_dir(tmp_path, {"x": (10.0, 10), "y": (20.0, 20), "z": (5.0, 5)},
                                        {"z": (10.0, 5), "y": (40.0, 20), "x": (20.0, 10)})
    table = ablation_table(eval_json, adapters, tmp_path / "unused.jsonl")
    assert "| 3 | 123 | 369 | lima 3 |" in table and "| 3 | 123 | 369 | web 3 |" in table
    assert "NLL/token -1.0000" in table and "[-1.0000, -1.0000]" in table and "(a) lower than (b) on 3 of 3 answers): (a) lower" in table
    assert "judged" not in table  # no judge: no judge sentence
    # an adapter trained before target_tokens_trained existed shows only its one-pass count
    (tmp_path / "ablate-random/train_config.json").write_text(json.dumps({"target_tokens": 123}))
    assert "| 3 | 123 | - | web 3 |" in ablation_table(eval_json, adapters, tmp_path / "unused.jsonl")


def test_ablation_table_over_several_draws_needs_a_to_beat_every_draw(tmp_path):
    answers = {"x": (10.0, 10), "y": (20.0, 20), "z": (5.0, 5)}

    def worse(by):  # NLL higher by ``by`` nats/token on every answer
        return {i: (s + by * t, t) for i, (s, t) in answers.items()}
    eval_json, adapters = _ablation_dir(tmp_path / "beats", answers, worse(1.0), worse(0.5), worse(2.0))
    table = ablation_table(eval_json, adapters, tmp_path / "unused.jsonl")
    assert "over 3 random draws" in table and "(a) 1.000, (b) 2.167 on average (sd 0.7638, range 1.500 to 3.000)" in table
    assert "(a) - mean (b) -1.1667" in table and "Verdict: (a) lower than every one of the 3 draws" in table
    assert "about 1 time in 4" in table and "(b) random, draw 3 (sample and training seed +2)" in table
    assert "(b) random, same size, uncurated, draw 1" in table
    # below two draws but above the third: a lucky (a) is not enough
    eval_json, adapters = _ablation_dir(tmp_path / "between", answers, worse(1.0), worse(-0.5), worse(2.0))
    table = ablation_table(eval_json, adapters, tmp_path / "unused.jsonl")
    assert "Verdict: not shown: (a) is lower than 2 of the 3 draws." in table
    # higher than every draw and beyond the answers' noise: the opposite verdict, with the same caveat
    eval_json, adapters = _ablation_dir(tmp_path / "above", worse(3.0), worse(1.0), worse(0.5), worse(2.0))
    table = ablation_table(eval_json, adapters, tmp_path / "unused.jsonl")
    assert "Verdict: (a) higher than every one of the 3 draws" in table and "about 1 time in 4" in table
    # below every draw, but only just and not on every answer: within the answers' noise
    near = {"x": (10.0, 10), "y": (20.0, 20), "z": (5.0, 5)}
    eval_json, adapters = _ablation_dir(tmp_path / "noise", {"x": (9.0, 10), "y": (21.0, 20), "z": (4.9, 5)},
                                        near, near)
    table = ablation_table(eval_json, adapters, tmp_path / "unused.jsonl")
    assert "not shown: (a) is lower than 2 of the 2 draws, but the gap to their mean is within the answers' noise" in table


def test_ablation_table_keeps_the_table_when_answers_cannot_be_compared(tmp_path):
    eval_json, adapters = _ablation_dir(tmp_path, {"x": (10.0, 10)}, {"x": (10.0, 11)})  # tokenized differently
    table = ablation_table(eval_json, adapters, tmp_path / "unused.jsonl")
    assert "| (a) curated" in table and "(a) - (b): not compared (reference 0: 10 tokens under A but 11" in table


def test_oracle_set_draws_the_same_size_from_one_source_only(tmp_path):
    from data.pairs import DataError, Pair, write_jsonl_atomic
    pool = [Pair(f"l{i}", "q", "o" * (i + 1), "lima", meta={"tag": "augmented"}) for i in range(6)] + \
        [Pair(f"w{i}", "q", "o" * 50, "web", meta={"tag": "augmented"}) for i in range(20)]
    write_jsonl_atomic(tmp_path / "augmented.jsonl", pool)
    write_jsonl_atomic(tmp_path / "curated.jsonl", [pool[0], pool[10], pool[11], pool[12]])
    args = (tmp_path / "augmented.jsonl", tmp_path / "curated.jsonl", 0)
    oracle = ablation_set("oracle", *args, source="lima")
    assert len(oracle) == 4 and {p.source for p in oracle} == {"lima"}
    assert all("tag" not in p.meta for p in oracle)  # one tag line for every set, as for (b)
    # as many answer characters as (a): 1 + 3 * 50, more than all 6 lima texts hold (21): refused, not shrunk
    with pytest.raises(DataError, match=r"source 'lima' has 21 answer tokens in all, fewer than the curated "
                                        r"set's 151"):
        ablation_set("oracle", *args, count_tokens=lambda p: len(p.output), source="lima")
    assert sum(len(p.output) for p in ablation_set("oracle", *args, count_tokens=lambda p: len(p.output),
                                                   source="web")) >= 151
    with pytest.raises(DataError, match=r"no pair comes from source 'c4' \(its sources: web 20, lima 6\)"):
        ablation_set("oracle", *args, source="c4")
    write_jsonl_atomic(tmp_path / "curated.jsonl", pool[:8])  # 8 pairs: more than lima's 6
    with pytest.raises(DataError, match=r"source 'lima' has 6 pairs in all, fewer than the curated set's 8"):
        ablation_set("oracle", *args, source="lima")
    # a pool of one source: (e) would be (b)'s first draw again
    write_jsonl_atomic(tmp_path / "augmented.jsonl", pool[6:])
    write_jsonl_atomic(tmp_path / "curated.jsonl", pool[6:9])
    with pytest.raises(DataError, match=r"every pair comes from 'web'.*needs a pooled --unlabelled"):
        ablation_set("oracle", *args, source="web")


def test_ablation_table_reads_the_oracle_control(tmp_path):
    answers = {"x": (10.0, 10), "y": (20.0, 20), "z": (5.0, 5)}

    def shifted(by):
        return {i: (s + by * t, t) for i, (s, t) in answers.items()}
    cases = {"lower": (shifted(-1.0), "Verdict: (e) lower than every one of the 2 draws", "does reward lima texts"),
             "not shown": (shifted(0.0), "Verdict: not shown: (e) is lower than 1 of the 2 draws",
                           "no evidence that training on lima texts only helps"),
             "higher": (shifted(1.0), "Verdict: (e) higher than every one of the 2 draws",
                        "lima texts only train worse than a random mix")}
    conclusions = [c for _, _, c in cases.values()]
    for outcome, (oracle, verdict, conclusion) in cases.items():
        eval_json, adapters = _ablation_dir(tmp_path / outcome, answers, shifted(0.1), shifted(-0.1), oracle=oracle)
        table = ablation_table(eval_json, adapters, tmp_path / "unused.jsonl", oracle="lima")
        assert "| (e) control: random, same size, lima texts only (a rater keeping just those) |" in table
        assert "(e) - (b), the control, lima texts only, over 2 random draws" in table and verdict in table
        assert [c in table for c in conclusions] == [c == conclusion for c in conclusions], outcome
    # not compared (tokenized differently): no conclusion drawn from it
    eval_json, adapters = _ablation_dir(tmp_path / "apart", answers, answers, oracle={**answers, "x": (10.0, 11)})
    table = ablation_table(eval_json, adapters, tmp_path / "unused.jsonl", oracle="lima", match="tokens")
    assert "(e) - (b): not compared" in table and not any(c in table for c in conclusions)
    assert "| (e) control: random, as many answer tokens as (a), lima texts only |" in table
