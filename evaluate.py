#!/usr/bin/env python
"""Does it work? Evaluate the models the pipeline makes, on held-out pairs, against the base model.

    python evaluate.py --model BASE [--quantize nf4] --out runs/a/eval \\
        --backward runs/a/backward/adapter --rater runs/a/m0/adapter --forward runs/a/forward/adapter

    # a local copy of guanaco's eval split, 20 pairs, the forward model only, no judge
    python evaluate.py --forward runs/demo/forward/adapter --no-judge --n 20 --out runs/demo/eval \\
        --heldout ../shared/data/guanaco/openassistant_best_replies_eval.jsonl

Give any of the three; each is measured for the adapter AND for the untrained base model prompted
the same way (the adapter is loaded into the base and taken out again, so one base serves all):

  --backward ADAPTER   instruction reconstruction: the backward model writes an instruction for each
                       held-out answer; BLEU and ROUGE-L against the human instruction.
  --rater ADAPTER      self-curation quality: the rater scores the real pairs and mismatched ones (the
                       same answers, instructions shuffled); ranking AUC of the 1-5 scores, of the
                       log-prob expected scores and of the likelihood gain the instruction gives the
                       output (no prompt), score histograms, rate of readable "Score: N" lines.
                       --rater base rates with the base model alone; --rater-model MODEL rates with
                       another (e.g. bigger) model, alone or with its own adapter.
  --forward ADAPTER    answering: NLL per token of the human answers, and how often a judge (default:
                       the base model itself, prompted to compare) prefers the adapter's answers to
                       the base's, both orders judged. Repeat the flag to compare several adapters
                       in one table (e.g. an ablation).

Held-out pairs (default: guanaco's eval split, which no stage trains on) that appear in an adapter's
training data (the 'data' that train.py records in adapter_config.json) or in --exclude are dropped.
Writes OUT/eval.json and OUT/eval.md (the tables), per-model rows (backward_*.jsonl, rater_*.jsonl,
forward_*.jsonl) and, when matplotlib is installed, OUT/rater_scores.png, OUT/loss_curves.png and,
with two or more --forward adapters, OUT/forward_nll.png (bars: NLL and win rate per model).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from generate import (INPUT_ERRORS, UsageError, adapter_settings, batch_seed, check_direction,
                      load_for_inference, resolve_tag, short)

DEFAULT_HELDOUT = "guanaco:timdettmers/openassistant-guanaco/openassistant_best_replies_eval.jsonl"
FORWARD_STOPS = ("\n### ",)  # as generate.py --predict: the answer ends at the next header


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate (one or more)")
    g.add_argument("--backward", metavar="ADAPTER", default=None,
                   help="backward adapter (train.py --direction backward)")
    g.add_argument("--rater", metavar="ADAPTER", default=None,
                   help="rater adapter (the seed model M0, a forward adapter), or 'base' for the base model alone")
    g.add_argument("--forward", metavar="ADAPTER", action="append", default=None,
                   help="forward adapter (M0, M1, ...); repeat to put several in one table")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m-instruct",
                   help="base model the adapters were trained on: folder, hub repo id, or 'smollm2-135m-instruct'")
    g.add_argument("--quantize", choices=["nf4"], default=None, help="load block linears as 4-bit NF4 (bitsandbytes)")
    g.add_argument("--dtype", default=None,
                   help="bf16 / fp32 / fp16 (default: bf16 on a GPU, with nf4, or on a CPU with native bf16; else fp32)")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    g.add_argument("--rater-model", default=None,
                   help="rate (--rater) with this model instead of --model: folder or hub id, loaded like --model, "
                        "e.g. a bigger chat model when the trained one is too small to follow the rating prompt; "
                        "--rater then names an adapter of it, or 'base' for it alone")
    g.add_argument("--judge", default=None,
                   help="judge model for --forward (folder or hub id, loaded like --model); default: the base model")
    g.add_argument("--no-judge", action="store_true", help="skip the pairwise preference (NLL only)")
    g = p.add_argument_group("held-out data")
    g.add_argument("--heldout", default=DEFAULT_HELDOUT,
                   help=f"pairs no model trained on: any data.readers spec (default {DEFAULT_HELDOUT})")
    g.add_argument("--n", type=int, default=50, help="seeded sample of this many pairs (default 50)")
    g.add_argument("--exclude", action="append", default=[],
                   help="drop held-out pairs that appear in this data too (repeatable; any data.readers spec)")
    g.add_argument("--max-output-chars", type=int, default=2000,
                   help="cut each held-out answer to this many characters, so prompts fit the context (default 2000)")
    g = p.add_argument_group("prompting and decoding (greedy by default, so runs repeat exactly)")
    g.add_argument("--tag", choices=["auto", "seed", "augmented", "none"], default="auto",
                   help="tag line of rater/forward prompts; auto = 'seed' if the adapter was trained with a tag "
                        "(the base model is prompted with the same tag as the adapter it is compared with)")
    g.add_argument("--k-shot", type=int, default=3, choices=range(0, 6), help="few-shot examples in the rating prompt")
    g.add_argument("--instruction-tokens", type=int, default=64, help="max new tokens per instruction (--backward)")
    g.add_argument("--rating-tokens", type=int, default=96, help="max new tokens per rating (--rater)")
    g.add_argument("--answer-tokens", type=int, default=256, help="max new tokens per answer (--forward)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="seed for the sample, the mismatching and sampling (default 0)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="folder for eval.json, eval.md, per-model rows and plots")
    g.add_argument("--no-plots", action="store_true", help="no PNG plots even if matplotlib is installed")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------- models as callables


class ModelFns:
    """The callables data/evaluation.py needs, bound to one loaded (model, tokenizer).

    They run whatever adapter is loaded into ``model`` at call time, so the same object serves
    the base and, inside :func:`adapter_loaded`, each adapter.
    """

    def __init__(self, model: Any, tok: Any, args: argparse.Namespace) -> None:
        self.model, self.tok, self.args = model, tok, args

    def completer(self, max_new_tokens: int, stop: Sequence[str]):
        from model.sampling import generate
        a = self.args

        def complete(prompts: list[str]) -> list[str]:
            return generate(self.model, self.tok, prompts, max_new_tokens=max_new_tokens, temperature=a.temperature,
                            top_p=a.top_p, stop=list(stop), seed=batch_seed(a.seed, prompts), batch_size=a.batch_size)
        return complete

    def logprobs(self, prompts: list[str], continuations: list[str]) -> list[list[float]]:
        from model.sampling import token_logprobs
        return [t.tolist() for t in token_logprobs(self.model, self.tok, prompts, continuations, self.args.batch_size)]

    def score_next(self):
        from data.curate import logprob_scorer
        return logprob_scorer(self.model, self.tok, batch_size=self.args.batch_size)

    def choose(self):
        from data.evaluation import choice_scorer
        return choice_scorer(self.model, self.tok, batch_size=self.args.batch_size)


def free_accelerator_memory() -> None:
    """Collect what no name holds any more and hand CUDA's cached blocks back, so the next model
    loaded finds the memory of one that is done (two 7B-class models rarely fit side by side)."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def adapter_loaded(model: Any, folder: str | None) -> Iterator[Any]:
    """Inside the block the model runs with the LoRA adapter in ``folder`` (or as the plain base
    when None); afterwards the LoRA layers are taken out again (not merged), so the next adapter,
    or the base, starts from exactly the original weights."""
    if folder is None:
        yield model
        return
    from lora.adapter import load_adapter
    from lora.inject import unwrap_lora
    load_adapter(model, folder)
    model.eval()
    try:
        yield model
    finally:
        unwrap_lora(model, merge=False)


def labels_for(adapters: Sequence[str | None]) -> list[str]:
    """Short, unique names for table rows: "base", or the run folder of RUN/adapter ("m0")."""
    names: list[str] = []
    for a in adapters:
        if a is None:
            name = "base"
        else:
            p = Path(a).resolve()
            name = p.parent.name if p.name == "adapter" else p.name
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}-{k}", k + 1
        names.append(unique)
    return names


# ---------------------------------------------------------------------------- held-out data


def load_heldout(args: argparse.Namespace, adapters: Sequence[str]) -> tuple[list, dict[str, Any]]:
    """The held-out sample, minus anything the adapters trained on or --exclude names."""
    from data.evaluation import drop_seen, heldout_sample
    from data.readers import format_stats, load_source
    pairs, stats = load_source(args.heldout)
    print(format_stats(args.heldout, stats))
    info: dict[str, Any] = dict(spec=args.heldout, rows=len(pairs), dropped_seen={})
    checks = {spec: "--exclude" for spec in args.exclude}  # spec -> why it is checked (each spec once)
    for a in adapters:
        data = adapter_settings(a).get("data")
        if data:
            checks.setdefault(data, f"training data of {a}")
    for spec, why in checks.items():
        try:
            seen, _ = load_source(spec)
        except INPUT_ERRORS as e:
            if why == "--exclude":
                raise
            print(f"note: cannot read the {why} ({e}); its overlap with the held-out set is not checked")
            continue
        pairs, dropped = drop_seen(pairs, seen)
        info["dropped_seen"][spec] = dropped
        if dropped:
            print(f"dropped {dropped} held-out pairs that are also in {spec} ({why})")
    pairs = heldout_sample(pairs, args.n, args.seed, args.max_output_chars)
    info["n"] = len(pairs)
    print(f"{len(pairs)} held-out pairs")
    return pairs, info


# ------------------------------------------------------------------------------ the three


def num(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from data.pairs import write_jsonl_atomic
    write_jsonl_atomic(path, rows)


def evaluate_backward_models(model: Any, tok: Any, adapter: str, pairs: list, args: argparse.Namespace,
                             out: Path) -> list[dict[str, Any]]:
    """BLEU / ROUGE-L of reconstructed instructions, for the base and the backward adapter."""
    from data.augment import AUGMENT_STOPS
    from data.evaluation import evaluate_backward
    check_direction(adapter_settings(adapter), "backward", "--backward (writing instructions for answers)")
    rows = []
    for label, path in zip(labels_for([None, adapter]), [None, adapter]):
        t0 = time.perf_counter()
        with adapter_loaded(model, path):
            fns = ModelFns(model, tok, args)
            summary, items = evaluate_backward(pairs, fns.completer(args.instruction_tokens, AUGMENT_STOPS))
        rows.append(dict(model=label, adapter=path, **summary, time_s=round(time.perf_counter() - t0, 1)))
        write_rows(out / f"backward_{label}.jsonl", items)
        print(f"backward [{label}]: BLEU {summary['bleu']:.2f}, ROUGE-L {summary['rouge_l']:.3f}; e.g. "
              f"{short(items[0]['generated'], 70)!r} for {short(items[0]['instruction'], 70)!r}")
    return rows


def evaluate_rater_models(model: Any, tok: Any, adapter: str, pairs: list, args: argparse.Namespace,
                          out: Path) -> list[dict[str, Any]]:
    """Real-vs-mismatched AUC of the rater's scores, for the rater adapter and the base."""
    from data.curate import RATER_STOPS
    from data.evaluation import evaluate_rater
    if len(pairs) < 2:
        raise UsageError("--rater needs at least 2 held-out pairs (to mismatch them)")
    adapters: list[str | None] = [None] if adapter == "base" else [None, adapter]
    settings = {} if adapter == "base" else adapter_settings(adapter)
    if adapter != "base":
        check_direction(settings, "forward", "--rater (the seed model answering the Table 1 prompt)")
    tag = resolve_tag(args.tag, settings)
    rows = []
    for label, path in zip(labels_for(adapters), adapters):
        t0 = time.perf_counter()
        with adapter_loaded(model, path):
            fns = ModelFns(model, tok, args)
            summary, _ = evaluate_rater(pairs, fns.completer(args.rating_tokens, RATER_STOPS), fns.score_next(),
                                        out / f"rater_{label}.jsonl", k_shot=args.k_shot, tag=tag, seed=args.seed,
                                        batch_size=args.batch_size, progress=not args.no_progress,
                                        logprobs=fns.logprobs)
        rows.append(dict(model=label, adapter=path, tag=tag or "none", k_shot=args.k_shot, **summary,
                         time_s=round(time.perf_counter() - t0, 1)))
        print(f"rater [{label}]: AUC {num(summary['auc'])} (expected score: {num(summary['auc_expected'])}, "
              f"likelihood: {num(summary['auc_likelihood'])}), valid score rate {summary['valid_score_rate']:.2f}")
    return rows


def evaluate_forward_models(model: Any, tok: Any, adapters: Sequence[str], pairs: list, args: argparse.Namespace,
                            out: Path, judge: ModelFns | None) -> list[dict[str, Any]]:
    """One table for any number of forward adapters: NLL per token of the human answers, and the
    judged preference of each adapter's answers over the base model's (prompted with the same tag).

    The base comes first (its row has no preference: it is the baseline). Every model answers
    first; the judge runs last, with no adapter loaded, so the default judge is the plain base.
    """
    from data.evaluation import JUDGE_STOPS, JUDGE_TOKENS, answer, judge_pairwise, reference_nll
    settings = [adapter_settings(a) for a in adapters]
    for a, s in zip(adapters, settings):
        check_direction(s, "forward", f"--forward {a} (answering instructions)")
    tags = [resolve_tag(args.tag, s) for s in settings]
    labels = labels_for([None, *adapters])
    done: dict[tuple[str | None, str | None], dict[str, Any]] = {}  # (adapter, tag) -> nll, answers

    def run(path: str | None, tag: str | None) -> dict[str, Any]:
        if (path, tag) not in done:
            t0 = time.perf_counter()
            with adapter_loaded(model, path):
                fns = ModelFns(model, tok, args)
                nll = reference_nll(pairs, fns.logprobs, tag)
                answers = answer(pairs, fns.completer(args.answer_tokens, FORWARD_STOPS), tag)
            per_pair = nll.pop("per_pair")  # to the per-pair files, not the table
            done[(path, tag)] = dict(nll=nll, per_pair=per_pair, answers=answers,
                                     time_s=round(time.perf_counter() - t0, 1))
        return done[(path, tag)]

    for a, tag in zip(adapters, tags):
        run(a, tag)
    for tag in dict.fromkeys(tags):
        run(None, tag)

    rows = []
    for tag in dict.fromkeys(tags):
        base = done[(None, tag)]
        rows.append(dict(model=labels[0], adapter=None, tag=tag or "none", n=len(pairs), **base["nll"],
                         time_s=base["time_s"]))
        write_rows(out / f"forward_{labels[0]}{'' if len(set(tags)) == 1 else '_' + (tag or 'none')}.jsonl",
                   [dict(id=p.id, instruction=p.instruction, reference=p.output, reference_nll_sum=s,
                         reference_tokens=t, answer=ans)
                    for p, (s, t), ans in zip(pairs, base["per_pair"], base["answers"])])
    questions = [p.instruction for p in pairs]
    for label, a, tag in zip(labels[1:], adapters, tags):
        res, base = done[(a, tag)], done[(None, tag)]
        row = dict(model=label, adapter=a, tag=tag or "none", n=len(pairs), **res["nll"], time_s=res["time_s"])
        items: list[dict[str, Any]] = [{} for _ in pairs]
        if judge is not None:
            t0 = time.perf_counter()
            pref, items = judge_pairwise(questions, res["answers"], base["answers"],
                                         judge.completer(JUDGE_TOKENS, JUDGE_STOPS), judge.choose())
            row.update(pref, judge_time_s=round(time.perf_counter() - t0, 1))
        rows.append(row)
        write_rows(out / f"forward_{label}.jsonl",
                   [dict(id=p.id, instruction=p.instruction, reference=p.output, reference_nll_sum=s,
                         reference_tokens=t, answer=ans, base_answer=b,
                         **{k: v for k, v in item.items() if k != "question"})
                    for p, (s, t), ans, b, item in zip(pairs, res["per_pair"], res["answers"], base["answers"], items)])
        pref_text = (f", vs base: {row['wins']} wins / {row['losses']} losses / {row['ties']} ties"
                     if judge is not None else "")
        print(f"forward [{label}]: NLL/token {row['nll']:.3f} (base {base['nll']['nll']:.3f}){pref_text}")
    return rows


# ---------------------------------------------------------------------------------- report


def render_markdown(report: dict[str, Any]) -> str:
    """eval.md: what was measured, one table per model kind, and how to read it."""
    from data.curate import render_histogram
    from data.evaluation import BACKWARD_COLUMNS, FORWARD_COLUMNS, RATER_COLUMNS, markdown_table
    h = report["heldout"]
    parts = [f"# Evaluation of {report['model']}", "",
             f"Held-out pairs: {h['n']} from `{h['spec']}` (seed {report['settings']['seed']}); "
             f"decoding: temperature {report['settings']['temperature']}."]
    if report.get("backward"):
        parts += ["", "## Backward model: instruction reconstruction", "",
                  markdown_table(report["backward"], BACKWARD_COLUMNS), "",
                  "BLEU (corpus, 0-100, sacrebleu's 13a tokens) and ROUGE-L (mean F, 0-1) of the generated "
                  "instruction against the human one; `empty`: generations with no instruction left after cleaning."]
    if report.get("rater"):
        rater_model = report["settings"].get("rater_model", report["model"])
        parts += ["", "## Rater: real vs mismatched pairs"
                  + ("" if rater_model == report["model"] else f" (rater model: {rater_model})"), "",
                  markdown_table(report["rater"], RATER_COLUMNS), "",
                  "AUC: probability that a real pair scores above a mismatched one (its instruction swapped with "
                  "another pair's), ties 1/2; 0.5 = chance. *expected score*: sum of s * p(s) over the log-probs "
                  "of \"1\"..\"5\" after \"Score:\". *likelihood*: no rating prompt; pairs ranked by how much the "
                  "instruction raises the log-likelihood of the output (nats/token, "
                  "data.curate.instruction_information). *valid score rate*: answers with a readable \"Score: N\"."]
        for row in report["rater"]:
            for kind in ("real", "mismatched"):
                parts += ["", f"Scores of {row['model']}, {kind} pairs:", "", "```",
                          render_histogram({int(k): v for k, v in row[f"histogram_{kind}"].items()}), "```"]
    if report.get("forward"):
        parts += ["", "## Forward model: answers", "", markdown_table(report["forward"], FORWARD_COLUMNS), "",
                  "NLL/token: mean negative log-likelihood (nats) of the human answers given the forward prompt; "
                  "lower is better. Wins/losses/ties against the base model's answers, judged in both orders by "
                  f"{report['settings']['judge']}: a win needs the judge to prefer the adapter in both orders, a "
                  "loss the base in both, anything else is a tie. *judge picks first*: share of verdicts for the "
                  "answer shown first (0.5 = no position bias); *judge fallback*: share decided by log p(A) vs "
                  "log p(B) because the judge's text was not exactly A, B or tie."]
    return "\n".join(parts) + "\n"


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """PNG plots when matplotlib is importable (it is optional): the rater's score histograms
    (real vs mismatched) and the training loss curves of the evaluated runs. Returns the files."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    raters = report.get("rater") or []
    if raters:
        fig, axes = plt.subplots(1, len(raters), figsize=(5 * len(raters), 3.5), squeeze=False)
        for ax, row in zip(axes[0], raters):
            scores = [1, 2, 3, 4, 5]
            for shift, kind in ((-0.2, "real"), (0.2, "mismatched")):
                hist = {int(k): v for k, v in row[f"histogram_{kind}"].items()}
                ax.bar([s + shift for s in scores], [hist.get(s, 0) for s in scores], width=0.4, label=kind)
            auc = row["auc"]
            ax.set(title=f"{row['model']} (AUC {auc:.2f})" if auc is not None else row["model"],
                   xlabel="score", ylabel="pairs", xticks=scores)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "rater_scores.png", dpi=100)
        plt.close(fig)
        written.append("rater_scores.png")
    forward = report.get("forward") or []
    if len(forward) >= 3:  # the base and two or more adapters: bars compare them (e.g. the ablation)
        labels = [row["model"] for row in forward]
        judged = [row for row in forward if row.get("win_rate") is not None]
        panels = 2 if judged else 1  # no judge, no win-rate panel
        fig, axes = plt.subplots(1, panels, figsize=(panels * (2 + 1.1 * len(forward)), 3.8), squeeze=False)
        axes = axes[0]
        nll = [row["nll"] for row in forward]
        # the ablation's question at a glance: curated (a) in orange, the control (e) in purple, against
        # the random draws of (b) in grey
        special = {"ablate-curated": "tab:orange", "ablate-oracle": "tab:purple"}
        colors = [special.get(m, "tab:gray" if m.startswith("ablate-random") else "tab:blue") for m in labels]
        bars = axes[0].bar(labels, nll, color=colors)
        axes[0].bar_label(bars, fmt="%.3f", fontsize=8)  # the ablation's differences are a few thousandths
        axes[0].set(title="held-out NLL/token (lower is better)", ylabel="nats/token")
        low, high = min(nll), max(nll)
        axes[0].set_ylim(max(0.0, low - max(0.05, high - low)), high + max(0.02, 0.15 * (high - low)))
        if judged:
            axes[1].bar([r["model"] for r in judged], [r["win_rate_ties_half"] for r in judged], color="tab:green")
            axes[1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
            axes[1].set(title="vs base: wins + ties/2", ylim=(0, 1))
        for ax in axes:
            ax.tick_params(axis="x", labelrotation=30)
        fig.tight_layout()
        fig.savefig(out / "forward_nll.png", dpi=100)
        plt.close(fig)
        written.append("forward_nll.png")
    runs = {}  # label -> metrics.jsonl of the run the adapter came from (train.py writes RUN/metrics.jsonl)
    for section in ("backward", "rater", "forward"):
        for row in report.get(section) or []:
            if row.get("adapter") and (Path(row["adapter"]).parent / "metrics.jsonl").is_file():
                runs[row["model"]] = Path(row["adapter"]).parent / "metrics.jsonl"
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, path in runs.items():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
            evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
            if train:
                line, = ax.plot(*zip(*train), label=f"{label} train")
                if evals:
                    ax.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{label} eval")
        ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=100)
        plt.close(fig)
        written.append("loss_curves.png")
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        forward = args.forward or []
        if args.rater_model and not args.rater:
            raise UsageError("--rater-model names the model --rater evaluates: add --rater base (or an adapter of it)")
        if not (args.backward or args.rater or forward):
            raise UsageError("nothing to evaluate: give --backward ADAPTER, --rater ADAPTER|base "
                             "and/or --forward ADAPTER")
        # A missing or broken adapter, or one trained in the other direction, fails before the slow part.
        wanted = [(args.backward, "backward", "--backward"), (args.rater, "forward", "--rater")]
        wanted += [(a, "forward", "--forward") for a in forward]
        for a, direction, flag in wanted:
            if a and a != "base":
                check_direction(adapter_settings(a), direction, f"{flag} {a}")
        adapters = [a for a, _, _ in wanted if a and a != "base"]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        pairs, heldout = load_heldout(args, adapters)

        def load(name: str) -> tuple[Any, Any]:  # --model, --rater-model and --judge load alike
            return load_for_inference(argparse.Namespace(model=name, quantize=args.quantize, dtype=args.dtype,
                                                         device=args.device, adapter=None))
        own_rater = bool(args.rater_model) and args.rater_model != args.model
        model, tok = load(args.model) if args.backward or forward or not own_rater else (None, None)
        judge = None
        if forward and not args.no_judge:
            judge = ModelFns(*load(args.judge), args) if args.judge else ModelFns(model, tok, args)
        settings = {k: getattr(args, k) for k in ("seed", "n", "k_shot", "tag", "temperature", "top_p",
                                                  "instruction_tokens", "rating_tokens", "answer_tokens",
                                                  "max_output_chars", "quantize")}
        settings["judge"] = "none" if args.no_judge else (args.judge or f"the base model ({args.model})")
        if args.rater:
            settings["rater_model"] = args.rater_model or args.model
        report: dict[str, Any] = dict(model=args.model, heldout=heldout, settings=settings)
        t0 = time.perf_counter()
        if args.backward:
            report["backward"] = evaluate_backward_models(model, tok, args.backward, pairs, args, out)
        if args.rater:
            rater = load(args.rater_model) if own_rater else (model, tok)
            report["rater"] = evaluate_rater_models(*rater, args.rater, pairs, args, out)
            del rater  # a second model's memory is given back before the forward models run
            if own_rater:
                free_accelerator_memory()
        if forward:
            report["forward"] = evaluate_forward_models(model, tok, forward, pairs, args, out, judge)
        report["time_s"] = round(time.perf_counter() - t0, 1)
        report["plots"] = [] if args.no_plots else plot(report, out)

        (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        markdown = render_markdown(report)
        (out / "eval.md").write_text(markdown)
        print("\n" + markdown)
        print(f"written: {out / 'eval.json'}, {out / 'eval.md'}" +
              "".join(f", {out / name}" for name in report["plots"]))
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
