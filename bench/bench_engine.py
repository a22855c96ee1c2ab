#!/usr/bin/env python
"""The method's two generation workloads: our engine (model/engine.py) vs transformers' ``generate``.

    python bench/bench_engine.py                        # both workloads, SmolLM2-135M, bf16
    python bench/bench_engine.py --workload rating      # one of them
    python bench/bench_engine.py --n-rating 16 --n-lima 30   # smaller, for a quick look
    python bench/bench_engine.py --drafts 2             # ours also with 2 prompt-lookup drafts a step

(a) **rating**: the paper's Table 1 prompt with k=2 few-shot examples over --n-rating real pairs
    (the demo's seed pairs, short, as the demo's curate stage rates; and guanaco's eval answers,
    long, so the shared prefix is a smaller part of each prompt), greedy, up to 48 new tokens,
    batch 8, the rater's stop strings;
(b) **backtranslation**: --n-lima single-turn LIMA completions (``../shared/data/lima``) in the
    backward prompt, greedy, up to 128 new tokens, batch 16, EOS allowed.

Both sides get the same token ids, the same stop ids (EOS), the same stop strings and the same
batch size, in one process, one after the other. transformers runs the best static batching a
user would write: prompts sorted by length, left-padded, ``generate`` per batch. Ours is the
public ``model.generate`` (eager, no compile). Reported: wall time, prompt and new tokens, the
ratio, and how many outputs are identical (bf16: a near-tie can part two greedy rows).
``--drafts K`` also runs ours with K prompt-lookup drafts per row and step (``generate(...,
draft_tokens=K)``, model/engine.py): its time, its speedup over transformers, and how many of its
outputs equal ours without drafts (exact in fp32; in bf16 a step of 1 + K tokens rounds otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import RATING_PAIRS, backtranslation_workload, rating_workload  # noqa: E402


def cut(text: str, stops) -> str:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else text


def run_ours(model, tok, prompts, max_new, batch, stops, drafts: int = 0) -> tuple[float, list[str]]:
    from model import generate
    t0 = time.perf_counter()
    out = generate(model, tok, prompts, max_new_tokens=max_new, stop=list(stops), batch_size=batch,
                   draft_tokens=drafts)
    return time.perf_counter() - t0, out


def run_hf(hf, hf_tok, tok, prompts, max_new, batch, stops) -> tuple[float, list[str]]:
    import torch
    from model.sampling import left_pad
    rows = [tok.encode(p, bos=tok.add_bos) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[str] = [""] * len(rows)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(order), batch):
            idx = order[k:k + batch]
            ids, mask = left_pad([rows[i] for i in idx], tok.pad_id, torch.device("cpu"))
            gen = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id,
                              stop_strings=list(stops), tokenizer=hf_tok)
            for i, row in zip(idx, gen[:, ids.shape[1]:].tolist()):
                ends = [j for j, t in enumerate(row) if t in tok.stop_ids or t == tok.pad_id]
                out[i] = cut(tok.decode(row[:ends[0]] if ends else row), stops)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workload", choices=["rating", "backtranslation", "both"], default="both")
    ap.add_argument("--rating-pairs", choices=sorted(RATING_PAIRS), action="append", default=None,
                    help="the pairs (a) rates, repeatable: demo (data/demo/seed.jsonl, short pairs: the demo's "
                         "curate stage) and/or guanaco (its eval answers, long) (default: both)")
    ap.add_argument("--n-rating", type=int, default=40, help="pairs to rate (default 40)")
    ap.add_argument("--n-lima", type=int, default=150, help="LIMA completions to backtranslate (default 150)")
    ap.add_argument("--drafts", type=int, default=0,
                    help="also run ours with this many prompt-lookup drafts per row and step (default 0: not)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from model import load_model
    from model.load import resolve_model_dir
    ours, tok = load_model(args.model, dtype="bf16", device="cpu")
    folder = resolve_model_dir(args.model)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    workloads = {f"rating ({which} pairs)": (lambda which=which: rating_workload(args.n_rating, which))
                 for which in args.rating_pairs or sorted(RATING_PAIRS)}
    workloads["backtranslation (LIMA)"] = lambda: backtranslation_workload(args.n_lima)
    chosen = [w for w in workloads if args.workload == "both" or w.startswith(args.workload)]
    results = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
               "model": args.model, "dtype": "bf16", "rows": []}
    print(f"{args.model}, bf16, {results['machine']}")
    extra = f" ours, {args.drafts} drafts s | speedup | same as ours |" if args.drafts else ""
    print("| workload | prompts | prompt tokens | max new | batch | ours s | transformers s | speedup | new tokens ours / HF "
          "| identical |" + extra)
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|---|---|" * bool(args.drafts))
    for name in chosen:
        prompts, max_new, batch, stops = workloads[name]()
        run_ours(ours, tok, prompts[:2], 4, 2, stops)  # warm-up, both sides
        run_hf(hf, hf_tok, tok, prompts[:2], 4, 2, stops)
        t_ours, out_ours = run_ours(ours, tok, prompts, max_new, batch, stops)
        t_hf, out_hf = run_hf(hf, hf_tok, tok, prompts, max_new, batch, stops)
        if args.drafts:
            t_d, out_d = run_ours(ours, tok, prompts, max_new, batch, stops, args.drafts)
        n_prompt = sum(len(tok.encode(p, bos=tok.add_bos)) for p in prompts)
        new_ours = sum(len(tok.encode(t)) for t in out_ours)
        new_hf = sum(len(tok.encode(t)) for t in out_hf)
        same = sum(a == b for a, b in zip(out_ours, out_hf))
        row = dict(workload=name, prompts=len(prompts), prompt_tokens=n_prompt, max_new_tokens=max_new, batch=batch,
                   ours_s=round(t_ours, 1), hf_s=round(t_hf, 1), speedup=round(t_hf / t_ours, 2),
                   new_tokens_ours=new_ours, new_tokens_hf=new_hf, identical=f"{same}/{len(prompts)}")
        cells = ""
        if args.drafts:
            same_d = sum(a == b for a, b in zip(out_d, out_ours))
            row.update(drafts=args.drafts, drafts_s=round(t_d, 1), drafts_speedup=round(t_hf / t_d, 2),
                       drafts_same_as_ours=f"{same_d}/{len(prompts)}")
            cells = f" {t_d:.1f} | **{t_hf / t_d:.2f}x** | {same_d}/{len(prompts)} |"
        results["rows"].append(row)
        print(f"| {name} | {len(prompts)} | {n_prompt} | {max_new} | {batch} | {t_ours:.1f} | {t_hf:.1f} | "
              f"**{t_hf / t_ours:.2f}x** | {new_ours} / {new_hf} | {same}/{len(prompts)} |" + cells, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
