"""Batched, KV-cached sampling and log-probability scoring: the two ways the pipeline uses a model.

``generate`` serves self-augmentation (the backward model writes instructions), the rater's
"Score: N" and the forward model's answers; ``next_token_logprobs`` serves the rater's fallback
(which of "1".."5" is likeliest after a forced "Score:"), ``token_logprobs``/``score`` the
likelihood rater and the evaluation's negative log-likelihoods.

``generate`` runs on the inference engine (model/engine.py): the prefix every prompt shares is
computed once, and a fixed number of cache rows ("slots") decode together, each refilled with the
next prompt as soon as its row ends. The two scorers share the prefix the same way.

``generate_tokens`` is the plain static-batch loop the engine replaces, kept because it is the
shortest complete picture of KV-cached decoding, and because the compiled decode step
(``compile=True``, model/compiled.py) runs on it: prompts are *left*-padded so that every row's
next token lands in the same cache slot; padding is hidden from attention by the mask, and each
row's positions count from its first real token (cumsum of the mask - 1), so a padded row
computes what it would alone. One prefill forward fills the cache, then each decode step feeds
one token per row.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import compiled, engine
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
                    generator: torch.Generator | Sequence[torch.Generator] | None = None,
                    should_stop: Callable[[list[int]], bool] | None = None,
                    compile: bool = False) -> list[list[int]]:
    """The decoding loop on token ids: new ids per row, ending before a stop id (not included)
    or after the step at which ``should_stop(new_ids)`` first says so. ``generator``: one for the
    batch, or one per row (each row then samples from its own, as the engine's rows do).

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
            if isinstance(generator, Sequence) and temperature > 0:
                nxt = torch.cat([sample_next(logits[i:i + 1], temperature, top_p, generator[i]) if i < n_rows
                                 else logits[i:i + 1].argmax(-1) for i in range(B)])  # padding rows: anything
            else:
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


def stop_checker(tokenizer: Tokenizer, stop: Sequence[str]) -> Callable[[list[int]], bool]:
    """``should_stop(new_ids)``: whether a stop string has appeared, checked incrementally: only
    the last few tokens are decoded (enough for the longest stop string, as every token decodes
    to at least one character), not the row's whole output at every step."""
    window = max(len(s) for s in stop) + 8
    return lambda new: _first_stop(tokenizer.decode(new[-window:]), stop) is not None


def _finish(tokenizer: Tokenizer, ids: list[int], stop: Sequence[str] | None) -> str:
    """A row's text: its new ids decoded once, cut before the first stop string."""
    text = tokenizer.decode(ids)
    cut = _first_stop(text, stop) if stop else None
    return text if cut is None else text[:cut]


def generate_stream(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                    seed: int = 0, batch_size: int = 16, progress: bool = False,
                    compile: bool = False, draft_tokens: int = 0) -> Iterator[tuple[int, str]]:
    """``generate``, yielding ``(index, text)`` for each prompt as soon as its row finishes (in the
    order rows finish, not the order of ``prompts``)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    rows = encode_prompts(tokenizer, prompts)
    should_stop = stop_checker(tokenizer, stop) if stop else None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt")
    if compile and compiled.supported(model):
        results = _static_batches(model, tokenizer, rows, max_new_tokens, temperature, top_p, should_stop, seed,
                                  batch_size)
    else:
        results = engine.stream(model, rows, max_new_tokens, tokenizer.pad_id, tokenizer.stop_ids, temperature,
                                top_p, seed, batch_size, should_stop, draft_tokens=draft_tokens)
    for i, ids in results:
        yield i, _finish(tokenizer, ids, stop)
        if bar:
            bar.update(1)
    if bar:
        bar.close()


def _static_batches(model: Llama, tokenizer: Tokenizer, rows: list[list[int]], max_new_tokens: int,
                    temperature: float, top_p: float, should_stop, seed: int,
                    batch_size: int) -> Iterator[tuple[int, list[int]]]:
    """The compiled path: prompts grouped by length into static batches (less padding) through
    ``generate_tokens``; each row still samples from its own generator (``engine.row_seed``)."""
    device = model.model.embed_tokens.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        gens = [torch.Generator(device=device).manual_seed(engine.row_seed(seed, rows[i])) for i in idx]
        new = generate_tokens(model, [rows[i] for i in idx], max_new_tokens, tokenizer.pad_id, tokenizer.stop_ids,
                              temperature, top_p, gens, should_stop, compile=True)
        yield from zip(idx, new)


def generate(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
             seed: int = 0, batch_size: int = 16, progress: bool = False, compile: bool = False,
             draft_tokens: int = 0) -> list[str]:
    """Complete every prompt; returns the new text of each (without the prompt), in order.

    ``batch_size`` prompts decode together (the engine's slots, refilled as rows finish: see
    model/engine.py); generation stops per row at an EOS/stop id or at the first of the ``stop``
    strings (which is cut off); sampling (temperature > 0, top-p) draws each prompt's tokens from
    a generator seeded by ``seed`` and that prompt, so a prompt gets the same text whatever the
    batch. ``compile=True`` compiles the decode step (see ``generate_tokens``): worth it for many
    prompts, not for a few. ``draft_tokens`` > 0 lets greedy rows check that many prompt-lookup
    guesses a step (model/engine.py; not with ``compile=True``): the same tokens in fewer steps
    (exactly in fp32; in bf16 a near-tie may go the other way), worth it where a step of a few
    tokens per row costs about what one of one token does (not on a small CPU).
    """
    results: list[str] = [""] * len(prompts)
    for i, text in generate_stream(model, tokenizer, prompts, max_new_tokens, temperature, top_p, stop, seed,
                                   batch_size, progress, compile, draft_tokens):
        results[i] = text
    return results


@torch.inference_mode()
def token_logprobs(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                   batch_size: int = 8) -> list[torch.Tensor]:
    """Per-token log p(continuation token | prompt, earlier tokens), one 1-D tensor per pair.

    Prompt and continuation are tokenized separately and concatenated, exactly as the training
    collator builds (prompt, target) examples, so scores and training losses agree. The prefix all
    prompts share is run once (model/engine.py), and only the positions that predict a
    continuation token go through the output head."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    pairs = [(tokenizer.encode(p, bos=tokenizer.add_bos), tokenizer.encode(c)) for p, c in zip(prompts, continuations)]
    for (p, _), text in zip(pairs, prompts):
        if not p:
            raise ValueError(f"empty prompt {text!r}: a continuation needs at least one token to condition on")
    P = engine.shared_prefix_len([p for p, _ in pairs])
    prefix = engine.prefix_for(model, pairs[0][0][:P])
    result: list[torch.Tensor] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        hidden, _ = engine.prefill_hidden(model, [(p + c)[P:] for p, c in chunk], prefix, tokenizer.pad_id)
        for i, (p, c) in enumerate(chunk):
            # the hidden state at suffix position j predicts token j + 1
            first = len(p) - 1 - P
            logp = F.log_softmax(model.lm_head(hidden[i, first:first + len(c)]).float(), dim=-1)
            targets = torch.tensor(c, dtype=torch.long, device=logp.device)
            result.append(logp.gather(-1, targets[:, None]).squeeze(-1).cpu())
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
    rows = [r + list(suffix_ids) for r in encode_prompts(tokenizer, prompts)]
    if any(not r for r in rows):
        raise ValueError("empty prompt: the next token needs at least one token to condition on")
    P = engine.shared_prefix_len(rows)  # the rating prompts' instructions and examples: run once
    prefix = engine.prefix_for(model, rows[0][:P])
    out = []
    for start in range(0, len(rows), batch_size):
        suffixes = [r[P:] for r in rows[start:start + batch_size]]
        hidden, _ = engine.prefill_hidden(model, suffixes, prefix, tokenizer.pad_id)
        logits = engine.last_logits(model, hidden, [len(s) for s in suffixes])
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)
