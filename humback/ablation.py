"""The quality-vs-quantity ablation (the paper's section 4.3, in miniature): which pairs each
ablation model trains on, and the table that compares them.

(a) trains on the curated set, (b) on random samples of the uncurated augmented pairs of the same
size (as many pairs, or as many answer tokens; one or several draws), (c) on all of them, (d) is
the seed model M0. ``pipeline.py --ablation`` runs :func:`ablation_stages`: it trains them
(:func:`ablation_set` gives each its pairs) and evaluates them with ``evaluate.py``;
:func:`ablation_table` turns that evaluation into ``ablation.md``, ending with the comparison the
paper's claim rests on: is (a) better than (b) by more than luck?

(e), optional, is a control for that comparison: a same-size sample drawn only from one source
of a pooled input (say the LIMA answers of a LIMA + web pool), i.e. what a rater that knew which
texts are the good ones would keep. If (e) is not shown better than (b) either, the comparison
of (a) with (b) says little about the rater: this held-out metric does not reward even a perfect
choice of source at this scale.
"""
from __future__ import annotations

import json
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from data.pairs import DataError, iter_jsonl, read_pairs, sample, sample_to_budget, write_jsonl_atomic
from humback.eval_report import markdown_table
from humback.metrics import nll_gap_to_draws
from humback.pipeline_run import Run, heldout_files
from humback.training import answer_tokens


def ablation_stages(run: Run, augmented: Path, curated: Path, m0: Path, seed_file: Path) -> None:
    """The ablation's stages: one forward model per training set (ablate-curated, ablate-random
    and its extra draws, ablate-oracle, ablate-all), then their evaluation with M0 as (d) (ablation).

    Every set trains the same way (--train-args, then --ablation-train-args) with the seed tag
    line, compared on the held-out pairs. M0 is reused as the m0 stage trained it, so
    --ablation-train-args (e.g. more epochs for the small sets) do not apply to it.
    """
    args, pre = run.args, run.pre
    ablation_train = pre.train + shlex.split(args.ablation_train_args)
    adapters = []
    # (b) once per draw k = 0 .. K-1 (stages ablate-random, ablate-random-2, ...): sample and training seed SEED + k
    sets = [("curated", "ablate-curated", 0)] + \
        [("random", "ablate-random" + (f"-{k + 1}" if k else ""), k) for k in range(args.ablation_draws)] + \
        ([("oracle", "ablate-oracle", 0)] if args.ablation_oracle else []) + [("all", "ablate-all", 0)]
    for which, name, k in sets:
        def body(d: Path, which=which, name=name, k=k) -> list[str]:
            argv = run.train_argv(d / "data" / "train.jsonl", d, flags=ablation_train, seed=args.seed + k)
            # "tokens": counted as this very training will count them (template, tag, --max-len)
            count = answer_tokens(argv) if which in ("random", "oracle") and args.ablation_match == "tokens" else None
            rows = ablation_set(which, augmented, curated, args.seed + k, count, source=args.ablation_oracle)
            write_jsonl_atomic(d / "data" / "train.jsonl", rows)
            print(f"{name}: {len(rows)} training pairs")
            return run.train(argv)
        # (c) does not depend on curation: changing the rater must not retrain it
        inputs = [augmented] if which == "all" else [augmented, curated]
        config = {"model": pre.model, "quantize": pre.quantize, "set": which, "train": ablation_train,
                  "seed": args.seed + k}
        # absent by default: older runs stay cached
        if which in ("random", "oracle") and args.ablation_match != "pairs":
            config["match"] = args.ablation_match
        if which == "oracle":
            config["source"] = args.ablation_oracle
        adapters.append(run.stage(name, config, inputs, body, at=f"ablate-{which}") / "adapter")
    adapters.append(m0)  # (d) seed only: M0 is exactly that model

    def evaluate_all(d: Path) -> list[str]:
        run.evaluate([x for a in adapters for x in ("--forward", str(a))], d)
        (d / "ablation.md").write_text(ablation_table(d / "eval.json", adapters, seed_file, args.ablation_match,
                                                      args.ablation_oracle))
        print((d / "ablation.md").read_text())
        return ["eval.json", "eval.md", "ablation.md"]
    config = {"model": pre.model, "heldout": pre.heldout, "evaluate": run.eval_flags, "seed": args.seed}
    if args.ablation_match != "pairs":  # its wording changes even if no adapter does
        config["match"] = args.ablation_match
    run.stage("ablation", config, [*adapters, *heldout_files(pre.heldout)], evaluate_all)


def ablation_set(which: str, augmented: Path, curated: Path, seed: int,
                 count_tokens: Callable[[Any], int] | None = None, source: str | None = None) -> list:
    """The training pairs of one ablation model: the curated set ("curated"), a same-size random
    sample of the augmented pairs, uncurated ("random"), the same from the pairs whose text came
    from ``source`` only ("oracle"), or all of them ("all"); every pair without its tag (one tag
    line). "Same size" is the same number of pairs (the paper's comparison) or, given
    ``count_tokens(pair)``, as many answer tokens to train on (for a rater that prefers short or
    long answers: then the two sets differ in which pairs, not in how much text)."""

    def untagged(path: Path) -> list:  # one tag line for every set: the seed tag train.py adds
        return [replace(p, meta={k: v for k, v in p.meta.items() if k != "tag"}) for p in read_pairs(path)]
    if which == "all":  # (c) does not depend on curation
        return untagged(augmented)
    kept = untagged(curated) if curated.stat().st_size else []
    if not kept:
        raise DataError(f"{curated}: the curated set is empty, so there is nothing to compare (lower --threshold)")
    if which == "curated":
        return kept
    pool = untagged(augmented)
    if which == "oracle":
        sources = Counter(p.source or "?" for p in pool)
        listed = ", ".join(f"{s} {n}" for s, n in sources.most_common())
        pool = [p for p in pool if p.source == source]
        if not pool:
            raise DataError(f"{augmented}: no pair comes from source {source!r} (its sources: {listed})")
        if len(sources) == 1:  # the same sample as (b)'s first draw: a control that controls nothing
            raise DataError(f"{augmented}: every pair comes from {source!r}, so a set of its texts only is just "
                            f"another random set; the control needs a pooled --unlabelled (e.g. lima + web)")
    size = count_tokens or (lambda _: 1)  # answer tokens, or pairs
    need = sum(map(size, kept))
    chosen = sample_to_budget(pool, need, size, seed) if count_tokens else sample(pool, need, seed)
    # (b) always has enough (the curated pairs are in its pool); a smaller (e) would compare quantity
    # again, the very thing the ablation holds fixed
    if which == "oracle" and (have := sum(map(size, chosen))) < need:
        unit = "answer tokens" if count_tokens else "pairs"
        raise DataError(f"{augmented}: source {source!r} has {have} {unit} in all, fewer than the curated set's "
                        f"{need}: sample more texts from it (--n-unlabelled)")
    return chosen


def ablation_table(eval_json: Path, adapters: list[Path], seed_file: Path, match: str = "pairs",
                   oracle: str | None = None) -> str:
    """ablation.md: one row per training set (its size and where its texts came from) from
    evaluate.py's eval.json, and whether curated beat random by more than the held-out sample's
    noise (and, with an (e) trained on source ``oracle`` only, whether that control did)."""
    report = json.loads(eval_json.read_text())
    what = {"ablate-curated": "(a) curated (rated >= threshold)", "ablate-random": "(b) random, same size, uncurated",
            "ablate-all": "(c) all augmented", "m0": "(d) seed only (M0, without --ablation-train-args)",
            "base": "base model, no adapter",
            "ablate-oracle": f"(e) control: random, same size, {oracle} texts only (a rater keeping just those)"}
    if match == "tokens":
        what["ablate-random"] = "(b) random, as many answer tokens as (a), uncurated"
        what["ablate-oracle"] = f"(e) control: random, as many answer tokens as (a), {oracle} texts only"
    labels = [Path(a).parent.name for a in adapters]  # the stage folders: ablate-curated, ..., m0
    if "ablate-random-2" in labels:
        what["ablate-random"] += ", draw 1"
    what |= {f"ablate-random-{k}": f"(b) random, draw {k} (sample and training seed +{k - 1})"
             for k in range(2, len(adapters) + 1)}
    sizes, tokens, sources = {"base": 0}, {}, {}
    for a in adapters:
        label = Path(a).parent.name
        data = Path(a).parent / "data" / "train.jsonl"
        pairs = read_pairs(data if data.exists() else seed_file)
        sizes[label] = len(pairs)
        # Same size in pairs is not the same amount of training: a rater that prefers short answers
        # gives fewer answer tokens (train.py counts them after --eval-frac, truncated to --max-len, one
        # EOS per pair: one pass over its split, and what all its steps saw; adapters trained before
        # that second count existed have only the first).
        cfg = json.loads((Path(a).parent / "train_config.json").read_text()) \
            if (Path(a).parent / "train_config.json").exists() else {}
        tokens[label] = (cfg.get("target_tokens", "-"), cfg.get("target_tokens_trained", "-"))
        sources[label] = ", ".join(f"{k} {v}" for k, v in Counter(p.source or "?" for p in pairs).most_common())
    rows = [dict(row, set=what.get(row["model"], row["model"]), pairs=sizes.get(row["model"], "-"),
                 epoch_tokens=tokens.get(row["model"], ("-", "-"))[0],
                 all_tokens=tokens.get(row["model"], ("-", "-"))[1], sources=sources.get(row["model"], "-"))
            for row in report["forward"]]
    columns = [("set", "training set", ""), ("pairs", "pairs", ""), ("epoch_tokens", "answer tokens per epoch", ""),
               ("all_tokens", "answer tokens, all steps", ""), ("sources", "texts from", ""),
               ("nll", "held-out NLL/token", ".3f"), ("wins", "wins", ""), ("losses", "losses", ""),
               ("ties", "ties", ""), ("win_rate", "win rate", ".2f")]
    h = report["heldout"]
    judge = report["settings"].get("judge")
    text = ("# Quality vs quantity\n\n" + markdown_table(rows, columns) + "\n\n"
            f"Held-out: {h['n']} pairs from `{h['spec']}`. NLL/token of the human answers (lower is better)"
            + (f"; wins/losses/ties against the base model's answers, judged in both orders by {judge}.\n"
               if judge and judge != "none" else ".\n"))
    draws = [x for x in labels if x.startswith("ablate-random")]
    claim = "the paper's claim" if match == "pairs" else "with as many answer tokens"
    text += compare_to_draws(eval_json.parent, "ablate-curated", "(a)", draws, claim)[0]
    if "ablate-oracle" in labels:
        sentence, outcome = compare_to_draws(eval_json.parent, "ablate-oracle", "(e)", draws,
                                             f"the control, {oracle} texts only")
        text += sentence + {
            "lower": f"\nSo this held-out metric does reward {oracle} texts over a random mix: a rater that "
                     f"picked them would show a gain here.\n",
            "not shown": f"\nSo there is no evidence that training on {oracle} texts only helps on this held-out "
                         f"metric: a rater that kept exactly them would not be shown better than random here "
                         f"either, and (a) vs (b) says little about the rater.\n",
            "higher": f"\nSo {oracle} texts only train worse than a random mix for these held-out answers: here "
                      f"{oracle} is not the better source, and this control says nothing about the rater.\n",
        }.get(outcome, "")
    return text


def compare_to_draws(folder: Path, label: str, name: str, draws: list[str],
                     claim: str) -> tuple[str, str | None]:
    """The sentence of ablation.md that compares model ``label`` (called ``name``: "(a)") with the
    random draws of (b), from evaluate.py's per-answer rows in ``folder`` ("" if there is nothing
    to compare), and its outcome: "lower", "higher", "not shown", or None when not compared. Two
    kinds of luck must both be ruled out before a verdict: which held-out answers were drawn (a
    bootstrap interval) and which pairs and seed the random set drew (is it better than every one
    of the K draws?)."""
    per_pair = {}
    for x in [label, *draws]:
        f = folder / f"forward_{x}.jsonl"
        if f.exists():  # joined on the held-out pair's id, not on row order
            per_pair[x] = {r["id"]: (r["reference_nll_sum"], r["reference_tokens"]) for _, r in iter_jsonl(f)
                           if "reference_nll_sum" in r}
    if not draws or len(per_pair) != 1 + len(draws) or not all(per_pair.values()):
        return "", None
    ids = [i for i in per_pair[label] if all(i in per_pair[d] for d in draws)]
    try:
        g = nll_gap_to_draws([per_pair[label][i] for i in ids], [[per_pair[d][i] for i in ids] for d in draws])
    except ValueError as e:  # the table above still stands without this line
        return f"\n{name} - (b): not compared ({e}).\n", None
    interval = (f"95% bootstrap interval over the {g['n']} held-out answers [{g['low']:+.4f}, {g['high']:+.4f}]; "
                f"{name} lower than {'(b)' if len(draws) == 1 else 'the draws' + chr(39) + ' mean'} on "
                f"{g['a_better']} of {g['n']} answers")
    k = len(draws)
    if k == 1:
        outcome = "lower" if g["high"] < 0 else "higher" if g["low"] > 0 else "not shown"
        verdict = {"lower": f"{name} lower", "higher": "(b) lower",
                   "not shown": "not shown: the gap is within the noise of which answers were drawn"}[outcome]
        # The interval covers which held-out answers were drawn, not which pairs (b) drew or the
        # training seed: another random sample of the same size can differ by as much.
        return (f"\n{name} - (b), {claim}: NLL/token {g['gap']:+.4f} ({interval}): {verdict}, for these two "
                f"trained models (one random draw of (b), one training seed; --ablation-draws K trains K).\n",
                outcome)
    # Even when both are ruled out, K draws leave one model below all of them by luck about
    # 1 time in K + 1.
    m = g["a_lower_than"]
    lower, higher = m == k and g["high"] < 0, m == 0 and g["low"] > 0
    if lower or higher:
        verdict = (f"{name} {'lower' if lower else 'higher'} than every one of the {k} draws, and than their mean "
                   f"beyond the answers' noise; if the choice of pairs made no difference this would still happen "
                   f"by luck about 1 time in {k + 1}")
    else:
        verdict = (f"not shown: {name} is lower than {m} of the {k} draws"
                   + ("" if m not in (0, k) else ", but the gap to their mean is within the answers' noise"))
    mean = sum(g["draw_nll"]) / k
    return (f"\n{name} - (b), {claim}, over {k} random draws of (b) (draw k: sample and training seed SEED+k-1; "
            f"{name} trains with SEED): {name} {g['a_nll']:.3f}, (b) {mean:.3f} on average (sd {g['draw_sd']:.4f}, "
            f"range {min(g['draw_nll']):.3f} to {max(g['draw_nll']):.3f}); {name} - mean (b) {g['gap']:+.4f} "
            f"({interval}). Verdict: {verdict}.\n", "lower" if lower else "higher" if higher else "not shown")
