"""Does it work? ``evaluate.py``: every model the pipeline makes, measured on held-out pairs
against the untrained base model prompted the same way.

One base model is loaded (``--model``); each adapter is loaded into it and taken out again
(:func:`humback.inference.adapter_loaded`), so one base serves all. For each kind of model,
one function runs the measurement of :mod:`humback.measures` on it and on the base:

* :func:`evaluate_backward_models`: instruction reconstruction (BLEU, ROUGE-L);
* :func:`evaluate_rater_models`: real vs mismatched pairs (AUC of the rater's scores);
* :func:`evaluate_forward_models`: NLL of the human answers, and judged wins against the base.

:func:`run` ties them together and writes the report (:mod:`humback.eval_report`).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.pairs import write_jsonl_atomic
from data.readers import format_stats, load_source
from data.templates import HEADER_STOP
from humback import eval_report, inference
from humback.backtranslate import AUGMENT_STOPS
from humback.cli import INPUT_ERRORS, UsageError, fail, short
from humback.inference import Complete, adapter_settings, check_direction, resolve_tag
from humback.measures import (JUDGE_STOPS, JUDGE_TOKENS, Choose, answer, choice_scorer, drop_seen, evaluate_backward,
                              evaluate_rater, heldout_sample, judge_pairwise, reference_nll)
from humback.rating import RATER_STOPS, ScoreNext, logprob_scorer, prompt_format_name


# --------------------------------------------------------------------- models as callables


class ModelFns:
    """The callables humback/measures.py needs, bound to one loaded (model, tokenizer).

    They run whatever adapter is loaded into ``model`` at call time, so the same object serves
    the base and, inside :func:`humback.inference.adapter_loaded`, each adapter.
    """

    def __init__(self, model: Any, tok: Any, args: argparse.Namespace) -> None:
        self.model, self.tok, self.args = model, tok, args

    def completer(self, max_new_tokens: int, stop: Sequence[str]) -> Complete:
        return inference.completer(self.model, self.tok, self.args, max_new_tokens, stop)

    def logprobs(self, prompts: list[str], continuations: list[str]) -> list[list[float]]:
        return inference.logprobs_fn(self.model, self.tok, self.args.batch_size)(prompts, continuations)

    def score_next(self) -> ScoreNext:
        return logprob_scorer(self.model, self.tok, batch_size=self.args.batch_size)

    def choose(self) -> Choose:
        return choice_scorer(self.model, self.tok, batch_size=self.args.batch_size)


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


def evaluate_backward_models(model: Any, tok: Any, adapter: str, pairs: list, args: argparse.Namespace,
                             out: Path) -> list[dict[str, Any]]:
    """BLEU / ROUGE-L of reconstructed instructions, for the base and the backward adapter."""
    check_direction(adapter_settings(adapter), "backward", "--backward (writing instructions for answers)")
    rows = []
    for label, path in zip(labels_for([None, adapter]), [None, adapter]):
        t0 = time.perf_counter()
        with inference.adapter_loaded(model, path):
            fns = ModelFns(model, tok, args)
            summary, items = evaluate_backward(pairs, fns.completer(args.instruction_tokens, AUGMENT_STOPS))
        rows.append(dict(model=label, adapter=path, **summary, time_s=round(time.perf_counter() - t0, 1)))
        write_jsonl_atomic(out / f"backward_{label}.jsonl", items)
        print(f"backward [{label}]: BLEU {summary['bleu']:.2f}, ROUGE-L {summary['rouge_l']:.3f}; e.g. "
              f"{short(items[0]['generated'], 70)!r} for {short(items[0]['instruction'], 70)!r}")
    return rows


def evaluate_rater_models(model: Any, tok: Any, adapter: str, pairs: list, args: argparse.Namespace,
                          out: Path) -> list[dict[str, Any]]:
    """Real-vs-mismatched AUC of the rater's scores, for the rater adapter and the base."""
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
        chat = inference.prompt_chat_format(tok, path, args.prompt_format)  # a chat model alone: its template
        row_tag = inference.rating_tag(args.tag, tag, chat, f"the rater [{label}]")
        with inference.adapter_loaded(model, path):
            fns = ModelFns(model, tok, args)
            summary, _ = evaluate_rater(pairs, fns.completer(args.rating_tokens, RATER_STOPS), fns.score_next(),
                                        out / f"rater_{label}.jsonl", k_shot=args.k_shot, tag=row_tag, seed=args.seed,
                                        batch_size=args.batch_size, progress=not args.no_progress,
                                        logprobs=fns.logprobs, chat=chat)
        rows.append(dict(model=label, adapter=path, tag=row_tag or "none", k_shot=args.k_shot,
                         prompt_format=prompt_format_name(chat), **summary,
                         time_s=round(time.perf_counter() - t0, 1)))
        print(f"rater [{label}, {rows[-1]['prompt_format']} prompt]: AUC {num(summary['auc'])} "
              f"(expected score: {num(summary['auc_expected'])}, "
              f"likelihood: {num(summary['auc_likelihood'])}), valid score rate {summary['valid_score_rate']:.2f}")
    return rows


def evaluate_forward_models(model: Any, tok: Any, adapters: Sequence[str], pairs: list, args: argparse.Namespace,
                            out: Path, judge: ModelFns | None) -> list[dict[str, Any]]:
    """One table for any number of forward adapters: NLL per token of the human answers, and the
    judged preference of each adapter's answers over the base model's (prompted with the same tag).

    The base comes first (its row has no preference: it is the baseline). Every model answers
    first; the judge runs last, with no adapter loaded, so the default judge is the plain base.
    """
    settings = [adapter_settings(a) for a in adapters]
    for a, s in zip(adapters, settings):
        check_direction(s, "forward", f"--forward {a} (answering instructions)")
    tags = [resolve_tag(args.tag, s) for s in settings]
    labels = labels_for([None, *adapters])
    done: dict[tuple[str | None, str | None], dict[str, Any]] = {}  # (adapter, tag) -> nll, answers

    def run(path: str | None, tag: str | None) -> dict[str, Any]:
        if (path, tag) not in done:
            t0 = time.perf_counter()
            with inference.adapter_loaded(model, path):
                fns = ModelFns(model, tok, args)
                nll = reference_nll(pairs, fns.logprobs, tag)
                answers = answer(pairs, fns.completer(args.answer_tokens, (HEADER_STOP,)), tag)
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
        write_jsonl_atomic(out / f"forward_{labels[0]}{'' if len(set(tags)) == 1 else '_' + (tag or 'none')}.jsonl",
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
        write_jsonl_atomic(out / f"forward_{label}.jsonl",
                           [dict(id=p.id, instruction=p.instruction, reference=p.output, reference_nll_sum=s,
                                 reference_tokens=t, answer=ans, base_answer=b,
                                 **{k: v for k, v in item.items() if k != "question"})
                            for p, (s, t), ans, b, item in zip(pairs, res["per_pair"], res["answers"],
                                                               base["answers"], items)])
        pref_text = (f", vs base: {row['wins']} wins / {row['losses']} losses / {row['ties']} ties"
                     if judge is not None else "")
        print(f"forward [{label}]: NLL/token {row['nll']:.3f} (base {base['nll']['nll']:.3f}){pref_text}")
    return rows


# ------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    """``evaluate.py``: load the models the flags name, measure each against the base on the held-out
    pairs, write OUT/eval.json, OUT/eval.md, the per-model rows and the plots; print the tables."""
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
            return inference.load_for_inference(argparse.Namespace(model=name, quantize=args.quantize,
                                                                   dtype=args.dtype, device=args.device, adapter=None))
        own_rater = bool(args.rater_model) and args.rater_model != args.model
        model, tok = load(args.model) if args.backward or forward or not own_rater else (None, None)
        judge = None
        if forward and not args.no_judge:
            judge = ModelFns(*load(args.judge), args) if args.judge else ModelFns(model, tok, args)
        settings = {k: getattr(args, k) for k in ("seed", "n", "k_shot", "tag", "prompt_format", "temperature", "top_p",
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
                inference.free_accelerator_memory()
        if forward:
            report["forward"] = evaluate_forward_models(model, tok, forward, pairs, args, out, judge)
        report["time_s"] = round(time.perf_counter() - t0, 1)
        report["plots"] = [] if args.no_plots else eval_report.plot(report, out)

        (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        markdown = eval_report.render_markdown(report)
        (out / "eval.md").write_text(markdown)
        print("\n" + markdown)
        print(f"written: {out / 'eval.json'}, {out / 'eval.md'}" +
              "".join(f", {out / name}" for name in report["plots"]))
    except INPUT_ERRORS as e:
        return fail(e)
    return 0
