"""The quality-vs-quantity ablation (the paper's section 4.3, in miniature): which pairs each
ablation model trains on, and the table that compares them.

(a) trains on the curated set, (b) on random samples of the uncurated augmented pairs of the same
size (as many pairs, or as many answer tokens; one or several draws), (c) on all of them, (d) is
the seed model M0. ``pipeline.py --ablation`` trains them and evaluates them with
``evaluate.py``; :func:`ablation_table` turns that evaluation into ``ablation.md``, ending with
the comparison the paper's claim rests on: is (a) better than (b) by more than luck?
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from data.evaluation import markdown_table
from data.metrics import nll_gap_to_draws
from data.pairs import DataError, iter_jsonl, read_pairs, sample, sample_to_budget


def ablation_set(which: str, augmented: Path, curated: Path, seed: int,
                 count_tokens: Callable[[Any], int] | None = None) -> list:
    """The training pairs of one ablation model: the curated set, a same-size random sample of
    the augmented pairs (uncurated), or all of them; every pair without its tag (one tag line).
    "Same size" is the same number of pairs (the paper's comparison) or, given
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
    if count_tokens is not None:
        return sample_to_budget(untagged(augmented), sum(map(count_tokens, kept)), count_tokens, seed)
    return sample(untagged(augmented), len(kept), seed)


def ablation_table(eval_json: Path, adapters: list[Path], seed_file: Path, match: str = "pairs") -> str:
    """ablation.md: one row per training set (its size and where its texts came from) from
    evaluate.py's eval.json, and whether curated beat random by more than the held-out sample's noise."""
    report = json.loads(eval_json.read_text())
    what = {"ablate-curated": "(a) curated (rated >= threshold)", "ablate-random": "(b) random, same size, uncurated",
            "ablate-all": "(c) all augmented", "m0": "(d) seed only (M0, without --ablation-train-args)",
            "base": "base model, no adapter"}
    if match == "tokens":
        what["ablate-random"] = "(b) random, as many answer tokens as (a), uncurated"
    if any(Path(a).parent.name == "ablate-random-2" for a in adapters):
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
        # gives fewer answer tokens (train.py counts those every step saw: after --eval-frac, truncated
        # to --max-len, one EOS per pair; adapters trained before it counted that, one pass over the split).
        cfg = json.loads((Path(a).parent / "train_config.json").read_text()) \
            if (Path(a).parent / "train_config.json").exists() else {}
        tokens[label] = cfg.get("target_tokens_trained",
                                f"{cfg['target_tokens']} per epoch" if "target_tokens" in cfg else "-")
        sources[label] = ", ".join(f"{k} {v}" for k, v in Counter(p.source or "?" for p in pairs).most_common())
    rows = [dict(row, set=what.get(row["model"], row["model"]), pairs=sizes.get(row["model"], "-"),
                 tokens=tokens.get(row["model"], "-"), sources=sources.get(row["model"], "-"))
            for row in report["forward"]]
    columns = [("set", "training set", ""), ("pairs", "pairs", ""), ("tokens", "answer tokens trained on", ""),
               ("sources", "texts from", ""),
               ("nll", "held-out NLL/token", ".3f"), ("wins", "wins", ""), ("losses", "losses", ""),
               ("ties", "ties", ""), ("win_rate", "win rate", ".2f")]
    h = report["heldout"]
    judge = report["settings"].get("judge")
    text = ("# Quality vs quantity\n\n" + markdown_table(rows, columns) + "\n\n"
            f"Held-out: {h['n']} pairs from `{h['spec']}`. NLL/token of the human answers (lower is better)"
            + (f"; wins/losses/ties against the base model's answers, judged in both orders by {judge}.\n"
               if judge and judge != "none" else ".\n"))
    draws = [Path(a).parent.name for a in adapters if Path(a).parent.name.startswith("ablate-random")]
    per_pair = {}
    for label in ["ablate-curated", *draws]:
        f = eval_json.parent / f"forward_{label}.jsonl"
        if f.exists():  # joined on the held-out pair's id, not on row order
            per_pair[label] = {r["id"]: (r["reference_nll_sum"], r["reference_tokens"]) for _, r in iter_jsonl(f)
                               if "reference_nll_sum" in r}
    if not draws or len(per_pair) != 1 + len(draws) or not all(per_pair.values()):
        return text
    ids = [i for i in per_pair["ablate-curated"] if all(i in per_pair[d] for d in draws)]
    try:
        g = nll_gap_to_draws([per_pair["ablate-curated"][i] for i in ids], [[per_pair[d][i] for i in ids]
                                                                          for d in draws])
    except ValueError as e:  # the table above still stands without this line
        return text + f"\n(a) - (b): not compared ({e}).\n"
    interval = (f"95% bootstrap interval over the {g['n']} held-out answers [{g['low']:+.4f}, {g['high']:+.4f}]; "
                f"(a) lower than {'(b)' if len(draws) == 1 else 'the draws' + chr(39) + ' mean'} on {g['a_better']} "
                f"of {g['n']} answers")
    k = len(draws)
    claim = "the paper's claim" if match == "pairs" else "with as many answer tokens"
    if k == 1:
        verdict = ("(a) lower" if g["high"] < 0 else "(b) lower" if g["low"] > 0
                   else "not shown: the gap is within the noise of which answers were drawn")
        # The interval covers which held-out answers were drawn, not which pairs (b) drew or the
        # training seed: another random sample of the same size can differ by as much.
        return text + (f"\n(a) - (b), {claim}: NLL/token {g['gap']:+.4f} ({interval}): {verdict}, for "
                       f"these two trained models (one random draw of (b), one training seed; --ablation-draws K "
                       f"trains K).\n")
    # Two kinds of luck, both must be ruled out: which held-out answers were drawn (the interval)
    # and which pairs/seed the random set drew (does (a) beat every one of the K draws?). Even then,
    # K draws leave (a) below all of them by luck about 1 time in K + 1.
    m = g["a_lower_than"]
    lower, higher = m == k and g["high"] < 0, m == 0 and g["low"] > 0
    if lower or higher:
        verdict = (f"(a) {'lower' if lower else 'higher'} than every one of the {k} draws, and than their mean "
                   f"beyond the answers' noise; if curation made no difference this would still happen by luck "
                   f"about 1 time in {k + 1}")
    else:
        verdict = (f"not shown: (a) is lower than {m} of the {k} draws"
                   + ("" if m not in (0, k) else ", but the gap to their mean is within the answers' noise"))
    mean = sum(g["draw_nll"]) / k
    return text + (f"\n(a) - (b), {claim}, over {k} random draws of (b) (draw k: sample and training seed "
                   f"SEED+k-1; (a) trains with SEED): (a) {g['a_nll']:.3f}, (b) {mean:.3f} on average (sd "
                   f"{g['draw_sd']:.4f}, range {min(g['draw_nll']):.3f} to {max(g['draw_nll']):.3f}); (a) - mean (b) "
                   f"{g['gap']:+.4f} ({interval}). Verdict: {verdict}.\n")
