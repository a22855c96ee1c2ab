"""Batched, KV-cached sampling and log-probability scoring: the two ways the pipeline uses a model.

``generate`` serves self-augmentation (the backward model writes instructions) and the forward
model's answers; ``score`` serves the rater's fallback (which of " 1".." 5" is likeliest) and the
evaluation's negative log-likelihoods.

Batching prompts of different lengths (as meta-llama's generation.py): prompts are *left*-padded
so that every row's next token lands in the same cache slot. Padding is hidden from attention by
the mask, and each row's positions count from its first real token (cumsum of the mask - 1), so a
padded row computes exactly what it would alone. Then one prefill forward fills the cache and
each decode step feeds one token per row.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import compiled
from .llama import Llama
from .tokenizer import Tokenizer


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from last-position logits (B, V): greedy when temperature == 0,
    else nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens entirely past the nucleus
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer.encode(p, bos=tokenizer.add_bos) for p in prompts]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with each row right-aligned; mask is 1 on real tokens."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = 1
    return ids.to(device), mask.to(device)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


@torch.inference_mode()
def generate_tokens(model: Llama, rows: list[list[int]], max_new_tokens: int, pad_id: int,
                    stop_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None,
                    should_stop: Callable[[list[int]], bool] | None = None,
                    compile: bool = False) -> list[list[int]]:
    """The decoding loop on token ids: new ids per row, ending before a stop id (not included)
    or after the step at which ``should_stop(new_ids)`` first says so.

    ``compile=True`` runs the decode steps through ``torch.compile`` (model/compiled.py): much
    faster per token, but the first call for a batch size compiles (about a minute for
    SmolLM2-135M on 2 cores). Models with LoRA or 4-bit layers, or on other devices, stay eager."""
    device = model.model.embed_tokens.weight.device
    n_rows = len(rows)
    fast = compile and compiled.supported(model)
    if fast:  # run at an already compiled batch size if one is close: pad with empty rows
        rows = list(rows) + [[]] * (compiled.batch_size(model, n_rows) - n_rows)
    ids, mask = left_pad(rows, pad_id, device)
    B, L = ids.shape
    mask = torch.cat([mask, torch.ones(B, max_new_tokens, dtype=mask.dtype, device=device)], dim=1)
    positions = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    done[n_rows:] = True  # padding rows: produce nothing, and never keep the batch going
    lengths = [max_new_tokens] * B
    if fast:
        compiled.setup_cache(model, B, L + max_new_tokens)
    else:
        model.setup_cache(B, L + max_new_tokens)
    try:
        logits = model(ids, mask[:, :L], positions, start_pos=0, last_only=True)[:, -1]
        pos = positions[:, -1:]
        for t in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            hit = torch.isin(nxt, stops) & ~done
            for i in hit.nonzero().flatten().tolist():
                lengths[i] = t  # the stop token itself is not part of the output
            done |= hit
            if should_stop is not None:
                for i in (~done).nonzero().flatten().tolist():
                    if should_stop(out[i, :t + 1].tolist()):
                        done[i] = True
                        lengths[i] = t + 1
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            pos = pos + 1
            if fast:
                logits = compiled.decode_step(model, nxt[:, None], mask[:, :L + t + 1], pos)
            else:
                logits = model(nxt[:, None], mask[:, :L + t + 1], pos, start_pos=L + t)[:, -1]
    finally:
        model.clear_cache()
    out = out.cpu()
    return [out[i, :lengths[i]].tolist() for i in range(n_rows)]


def generate_batch(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                   generator: torch.Generator | None = None, compile: bool = False) -> list[str]:
    """Complete one batch of prompts together (see module docstring). Returns only new text,
    cut before the first stop string."""
    should_stop = (lambda new: _first_stop(tokenizer.decode(new), stop) is not None) if stop else None
    new_ids = generate_tokens(model, encode_prompts(tokenizer, prompts), max_new_tokens, tokenizer.pad_id,
                              tokenizer.stop_ids, temperature, top_p, generator, should_stop, compile)
    texts = []
    for ids in new_ids:
        text = tokenizer.decode(ids)
        cut = _first_stop(text, stop) if stop else None
        texts.append(text if cut is None else text[:cut])
    return texts


def generate(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
             seed: int = 0, batch_size: int = 16, progress: bool = False, compile: bool = False) -> list[str]:
    """Complete every prompt; returns the new text of each (without the prompt), in order.

    Prompts are grouped by length into batches of ``batch_size`` (less padding), generation stops
    per row at an EOS/stop id or at the first of the ``stop`` strings (which is cut off), and
    ``seed`` makes sampling (temperature > 0, top-p) repeatable. ``compile=True`` compiles the
    decode step (see ``generate_tokens``): worth it for many prompts, not for a few.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt")
    for idx in batches:
        texts = generate_batch(model, tokenizer, [prompts[i] for i in idx], max_new_tokens, temperature,
                               top_p, stop, generator, compile)
        for i, t in zip(idx, texts):
            results[i] = t
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return results


@torch.inference_mode()
def token_logprobs(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                   batch_size: int = 8) -> list[torch.Tensor]:
    """Per-token log p(continuation token | prompt, earlier tokens), one 1-D tensor per pair.

    Prompt and continuation are tokenized separately and concatenated, exactly as the training
    collator builds (prompt, target) examples, so scores and training losses agree."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    device = model.model.embed_tokens.weight.device
    pairs = [(tokenizer.encode(p, bos=tokenizer.add_bos), tokenizer.encode(c)) for p, c in zip(prompts, continuations)]
    for (p, _), text in zip(pairs, prompts):
        if not p:
            raise ValueError(f"empty prompt {text!r}: a continuation needs at least one token to condition on")
    result: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        T = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), T), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, (p, c) in enumerate(chunk):  # right padding: positions 0.. for every row
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, :len(p) + len(c)] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = torch.arange(T, device=device).expand(len(chunk), T)
        logp = F.log_softmax(model(ids, mask, positions).float(), dim=-1)
        for i, (p, c) in enumerate(chunk):
            targets = ids[i, len(p):len(p) + len(c)]
            # logits at position j predict token j + 1
            result[start + i] = logp[i, len(p) - 1:len(p) + len(c) - 1].gather(-1, targets[:, None]).squeeze(-1).cpu()
    return result


def score(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], continuations: Sequence[str],
          batch_size: int = 8) -> list[float]:
    """Summed log-probability of each continuation given its prompt."""
    return [float(t.sum()) for t in token_logprobs(model, tokenizer, prompts, continuations, batch_size)]


@torch.inference_mode()
def next_token_logprobs(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str],
                        suffix_ids: Sequence[int] = (), batch_size: int = 8) -> torch.Tensor:
    """log p(next token | prompt + suffix_ids) over the whole vocabulary, (len(prompts), vocab),
    one forward per batch. The rater's fallback reads the five entries for "1".."5" from one row:
    five candidate scores for the price of one pass (``score`` would run one pass per candidate).
    ``suffix_ids``: tokens shared by every candidate before the one that differs (sentencepiece
    writes " 4" as "▁" + "4", so the "▁" goes here)."""
    device = model.model.embed_tokens.weight.device
    rows = [r + list(suffix_ids) for r in encode_prompts(tokenizer, prompts)]
    if any(not r for r in rows):
        raise ValueError("empty prompt: the next token needs at least one token to condition on")
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[start:start + batch_size], tokenizer.pad_id, device)
        logits = model(ids, mask, last_only=True)[:, -1]  # left padding: the last slot is every row's end
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)
