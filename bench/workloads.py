"""The method's two generation workloads as the benchmarks run them: prompts, limits, batch, stops.

Shared by ``bench_engine.py`` (ours vs transformers' ``generate``) and ``bench_prompt_lookup.py``
(how many tokens a step could accept from prompt-lookup drafts), so both measure the same prompts.
"""
from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout

RATING_PAIRS = {  # which pairs (a) rates: the demo's (short), or guanaco's eval answers (long)
    "demo": str(Path(__file__).resolve().parents[1] / "data/demo/seed.jsonl"),
    "guanaco": f"guanaco:{SHARED / 'data/guanaco/openassistant_best_replies_eval.jsonl'}",
}


def rating_workload(n: int, which: str) -> tuple[list[str], int, int, tuple[str, ...]]:
    """(a) rating: the Table 1 prompt with k=2 few-shot examples over the first ``n`` pairs of
    ``RATING_PAIRS[which]``; returns (prompts, max new tokens 48, batch 8, the rater's stop strings)."""
    from data.readers import load_source
    from data.templates import rating_prompt
    from humback.rating import RATER_STOPS
    pairs, _ = load_source(RATING_PAIRS[which])
    return [rating_prompt(p.instruction, p.output, 2) for p in pairs[:n]], 48, 8, RATER_STOPS


def backtranslation_workload(n: int) -> tuple[list[str], int, int, tuple[str, ...]]:
    """(b) backtranslation: the backward prompt over the first ``n`` single-turn LIMA completions;
    returns (prompts, max new tokens 128, batch 16, the augment stage's stop strings)."""
    from data.readers import load_source
    from data.templates import backward_prompt
    from humback.backtranslate import AUGMENT_STOPS, texts_to_backtranslate
    pairs, _ = load_source(f"lima:{SHARED / 'data/lima/train.jsonl'}")
    return [backward_prompt(p.output) for p in texts_to_backtranslate(pairs)[:n]], 128, 16, AUGMENT_STOPS
