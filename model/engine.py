"""The inference engine behind ``generate``: a shared-prefix KV cache and continuous batching.

The method's two generation workloads waste work in a static batch (``sampling.generate_tokens``):

* **Rating prompts are mostly one shared prefix.** The Table 1 instructions and the few-shot
  examples are the same in every rating prompt (80-87% of its tokens); only the pair differs.
  So the keys and values of that **prefix** are computed once, by one forward pass, and kept
  once, beside the rows (``KVCache.prefix``); each row runs only its own **suffix** after it,
  and a decode step reads the one copy for all rows together (vLLM's automatic prefix caching
  and SGLang's RadixAttention, for the one prefix all prompts share).
* **Rows finish at different times.** A static batch decodes until its longest row ends, and
  a row that hit EOS early keeps its place doing nothing. Here the cache has a fixed number of
  rows, the **slots**; when a row finishes (a stop token, a stop string, its token limit), its
  result is handed out and the slot is **refilled**: the next waiting prompt is prefilled into
  it, so the batch stays full until the work runs out (continuous batching, as in vLLM/Orca).
  Slots that free up together are filled by one prefill, up to ``PREFILL_TOKENS``. Prompts go
  in longest first, so the rows running together are about as long as each other: a step's
  attention spans the longest row's slots, and a group prefill pads to its longest prompt.
  When no prompt is left and half the slots are empty, the cache is compacted to the rows still
  running, so the tail costs what it computes.

Rows are independent. A slot's row has its own length and its own positions (no padding: a
prompt is prefilled from the end of the prefix, right-padded only within one prefill call),
each decode step writes each row's new keys/values (its last token, and its drafts if any) from
that row's own length on (``KVCache.update`` with a tensor of slots), and the attention mask
lets each row see only its own slots (and the prefix), causally. On a CPU the slots are
float32, the dtype the decode step's attention computes in (``model.llama.decode_attention``),
so no step converts the cache. A
sampled row draws from its own random generator, seeded from the run's seed and the row's
prompt (:func:`row_seed`), so what a prompt gets does not depend on which prompts share its
batch, the batch size, their order, the number of processes, or a resume.

Stop strings are checked incrementally: each step decodes only the last few tokens of a row
(enough to hold the longest stop string), not the row's whole output.

**Prompt-lookup drafts** (greedy rows, opt-in: ``draft_tokens``). A rater quotes the pair it
rates and a backward model the answer's words, so a row's next tokens are often a copy of what
followed the same last few tokens earlier in its prompt or output (:class:`_Lookup`; transformers'
``prompt_lookup_num_tokens`` and vLLM's n-gram speculator guess them the same way). A step then
feeds a row's last token and up to ``draft_tokens`` such guesses; the model's greedy choice after
each fed token checks the next guess, and the row keeps the guesses up to the first wrong one,
then takes the model's own token there. Every kept token is the one the model chooses, so the
output is the one without drafts (exactly in fp32: the tests; in bf16 a step of a few tokens per
row rounds otherwise, and a near-tie can go the other way); only the number of steps falls. A
step feeds every row 1 + the longest draft of any row (the others padded). It pays
where a step costs about the same for a few tokens per row as for one (the weights read once, as
on a GPU); on a 2-core CPU a step of 8 rows x 3 tokens costs about 1.4x one of 8 x 1, which eats
most of the gain (docs/benchmarks.md, "Prompt-lookup drafts"), so it is off by default.

Entry points: :func:`stream` (results as rows finish), and :func:`prefill_hidden` with
:func:`last_logits` (one batch of prompts after a shared prefix, for the log-probability
scorers in ``model/sampling.py``). Inside :func:`keep_prefixes` the prefix also outlives the
call, for the next calls that share it (a rating run's chunks and its fallback).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .llama import KVCache, Llama

# A prefix shorter than this is not worth a separate forward pass and the copies.
MIN_PREFIX = 16

# The longest n-gram a prompt-lookup draft is looked up by (then shorter ones).
DRAFT_NGRAM = 3

# Prompts are prefilled together while their padded block stays within this many tokens. On a
# CPU a long prompt's prefill is already compute-bound, and a bigger block only costs more
# (4 LIMA prompts of ~430 tokens: 1.59 s one at a time, 1.86 s in one block), while a few short
# suffixes after a shared prefix gain from reading the weights once for all of them.
PREFILL_TOKENS = 512


def row_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """The sampling seed of one row: from the run's ``seed`` and the row's own prompt (its token
    ids), so it is the same whatever else is in the batch."""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, prompt_ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one token of its own
    (the last prompt token's logits start the decoding). 0 when it is not worth sharing (one
    row, or fewer than ``MIN_PREFIX`` tokens)."""
    if len(rows) < 2:
        return 0
    first, n = rows[0], min(len(r) for r in rows) - 1
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n if n >= MIN_PREFIX else 0


@dataclass
class Prefix:
    """The keys and values of the prefix every prompt shares, per layer (1, kv heads, P, head dim)."""
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def compute(cls, model: Llama, ids: Sequence[int]) -> Prefix:
        """One forward pass over the prefix alone."""
        device = model.model.embed_tokens.weight.device
        caches = _caches(model, 1, len(ids))
        _run(model, caches, torch.tensor([list(ids)], device=device), None, None, 0)
        return cls(list(ids), [(c.k, c.v) for c in caches])


@contextmanager
def keep_prefixes(model: Llama) -> Iterator[None]:
    """Inside the block, the prefix computed for one call is kept for the next calls on ``model``.

    A rating run makes several calls after the same Table 1 prefix: ``generate`` per chunk of
    rows, then the fallback's log-probabilities; with a chat rater that prefix is 1,600 tokens of
    a 1.5B model, many seconds of prefill each time on a CPU. The caller promises the weights do not change
    inside the block (:func:`humback.inference.adapter_loaded` opens one around each adapter): a
    kept prefix would be stale after a weight update or an adapter swap."""
    before = getattr(model, "_kept_prefix", None)
    model._kept_prefix = [None]  # a list, so prefix_for can replace its element
    try:
        yield
    finally:
        model._kept_prefix = before


def prefix_for(model: Llama, ids: Sequence[int]) -> Prefix | None:
    """The keys and values of ``ids`` (None when empty): computed, or inside :func:`keep_prefixes`
    from the kept prefix. With causal attention a token's key and value do not depend on what
    follows it, so when ``ids`` is a beginning of the kept prefix they are a slice of it, and when
    the kept prefix is a beginning of ``ids`` (a chunk whose rows happen to share a few more
    tokens) only the extra tokens are run, after it."""
    if not ids:
        return None
    kept = getattr(model, "_kept_prefix", None)
    if kept is None:
        return Prefix.compute(model, ids)
    old, ids = kept[0], list(ids)
    if old is not None and ids[:len(old.ids)] == old.ids[:len(ids)]:
        n = len(ids)
        if n <= len(old.ids):
            return old if n == len(old.ids) else Prefix(ids, [(k[:, :, :n], v[:, :, :n]) for k, v in old.kv])
        _, caches = prefill_hidden(model, [ids[len(old.ids):]], old, pad_id=0)  # one row: no padding
        kept[0] = Prefix(ids, [(c.k, c.v) for c in caches])
        return kept[0]
    kept[0] = Prefix.compute(model, ids)
    return kept[0]


def _caches(model: Llama, batch: int, length: int, dtype: torch.dtype | None = None) -> list[KVCache]:
    """One empty KVCache per layer, on the model's device, in ``dtype`` (default: the model's)."""
    w = model.model.embed_tokens.weight
    return [KVCache(batch, length, layer.self_attn.n_kv_heads, layer.self_attn.head_dim, dtype or w.dtype, w.device)
            for layer in model.model.layers]


def _run(model: Llama, caches: list[KVCache], ids, mask, positions, start, hidden: bool = False):
    """``model(...)`` with ``caches`` as the layers' KV caches (the engine keeps its own)."""
    for layer, cache in zip(model.model.layers, caches):
        layer.self_attn.cache = cache
    try:
        return model(ids, mask, positions, start_pos=start, return_hidden=hidden)
    finally:
        model.clear_cache()


def prefill_hidden(model: Llama, suffixes: Sequence[Sequence[int]], prefix: Prefix | None,
                   pad_id: int, extra: int = 0) -> tuple[torch.Tensor, list[KVCache]]:
    """Run ``prefix + suffix`` for each row, the prefix from its cached keys and values: the final
    hidden states of the suffix tokens (B, T, hidden), right-padded to the longest suffix, and the
    filled caches (prefix + suffix slots, plus ``extra`` free slots for decoding)."""
    device = model.model.embed_tokens.weight.device
    P = len(prefix.ids) if prefix else 0
    B, T = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + T), dtype=torch.long)
    mask[:, :P] = 1
    for i, s in enumerate(suffixes):  # right padding: a real token never sees a pad after it
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, P:P + len(s)] = 1
    caches = _caches(model, B, P + T + extra)
    if prefix:
        for c, (k, v) in zip(caches, prefix.kv):
            c.k[:, :, :P] = k
            c.v[:, :, :P] = v
    positions = torch.arange(P, P + T, device=device).expand(B, T)
    hidden = _run(model, caches, ids.to(device), mask.to(device), positions, P, hidden=True)
    return hidden, caches


def last_logits(model: Llama, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Logits (B, vocab) after each row's last real token (row i's is at lengths[i] - 1)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = torch.tensor([n - 1 for n in lengths], device=hidden.device)
    return model.lm_head(hidden[rows, last].contiguous())


class _Lookup:
    """Prompt-lookup drafts for one row: what followed the row's last n tokens (n = ``DRAFT_NGRAM``
    down to 1) where they last occurred before, in its prompt or its output so far.

    ``seen`` maps every n-gram of the row to where its most recent earlier occurrence ends; it is
    filled as tokens arrive (each position once), so a lookup is a dict access, not a scan."""

    def __init__(self, ids: Sequence[int]):
        self.ids = list(ids)
        self.seen: dict[tuple[int, ...], int] = {}
        self.indexed = 1  # ids[e - n:e] for every e < indexed (n = 1..DRAFT_NGRAM) is in ``seen``

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` guessed next tokens (none when the last token never occurred before)."""
        ids, end = self.ids, len(self.ids)
        for e in range(self.indexed, end):  # n-grams ending at e; the one ending at `end` is the tail itself
            for n in range(1, min(DRAFT_NGRAM, e) + 1):
                self.seen[tuple(ids[e - n:e])] = e
        self.indexed = max(self.indexed, end)
        for n in range(min(DRAFT_NGRAM, end), 0, -1):
            e = self.seen.get(tuple(ids[end - n:]))
            if e is not None:
                return ids[e:e + k]
        return []


@dataclass
class _Slot:
    """What one cache row is doing: which prompt (its index), its length in the cache (its own
    tokens, after the shared prefix), the tokens generated so far, its random generator when
    sampling, and its drafts' lookup table when greedy."""
    index: int
    length: int
    new: list[int]
    generator: torch.Generator | None
    lookup: _Lookup | None = None


def _sample(logits: torch.Tensor, slots: list[_Slot], temperature: float, top_p: float) -> list[int]:
    """One token per row: greedy for all rows at once, or each row from its own generator."""
    from .sampling import sample_next
    if temperature <= 0:
        return logits.argmax(-1).tolist()
    return [int(sample_next(logits[i:i + 1], temperature, top_p, s.generator)) for i, s in enumerate(slots)]


@torch.inference_mode()
def stream(model: Llama, rows: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
           stop_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           n_slots: int = 16, should_stop: Callable[[list[int]], bool] | None = None,
           share_prefix: bool = True, draft_tokens: int = 0) -> Iterator[tuple[int, list[int]]]:
    """Generate for every prompt (token ids) and yield ``(index, new_ids)`` as each row finishes.

    A row ends before a stop id (not included), after ``max_new_tokens``, or after the step at
    which ``should_stop(new_ids)`` first says so (``sampling.generate`` passes an incremental stop
    string check). ``n_slots`` rows decode together; a finished row's slot takes the next prompt.
    The longest prefix every prompt shares is computed once (``share_prefix``, see
    :func:`shared_prefix_len`). Sampled rows (``temperature > 0``) are seeded by :func:`row_seed`.
    Greedy rows feed up to ``draft_tokens`` prompt-lookup guesses a step (0, the default: none),
    which change the number of steps, not the output (exactly in fp32; see the module docstring).
    """
    if not rows:
        return
    if any(not r for r in rows):
        raise ValueError("empty prompt: generation needs at least one token to condition on")
    if draft_tokens < 0:
        raise ValueError(f"draft_tokens must be 0 (no drafts) or more, got {draft_tokens}")
    device = model.model.embed_tokens.weight.device
    P = shared_prefix_len(rows) if share_prefix else 0
    prefix = prefix_for(model, rows[0][:P])
    stops = set(stop_ids)
    n = min(n_slots, len(rows))
    draft_tokens = draft_tokens if temperature <= 0 else 0  # sampled rows: no drafts (greedy checks them)
    # The slots hold each row's own tokens; the prefix is kept once, beside them (KVCache.prefix).
    # On a CPU they are float32, what a decode step's attention computes in: no copy per step.
    caches = _caches(model, n, max(len(r) for r in rows) - P + max_new_tokens + draft_tokens,
                     torch.float32 if device.type == "cpu" else None)
    for c, kv in zip(caches, prefix.kv if prefix else ()):
        c.prefix = (kv[0].float(), kv[1].float())
    slots: list[_Slot | None] = [None] * n
    logits = torch.zeros(n, model.config.vocab_size, dtype=model.model.embed_tokens.weight.dtype, device=device)
    # Prompts not yet admitted, the next one last: the longest first, so the rows running together
    # have similar lengths and a step's attention (over the longest row's slots) wastes little.
    waiting = sorted(range(len(rows)), key=lambda i: len(rows[i]))

    def admit(free: list[int], prompts: list[int]) -> None:
        """Prefill ``prompts`` into the cache rows ``free``: their suffixes after the prefix, in one
        forward pass, right-padded to the longest. Slots free up together (at the start, and
        when rows admitted together end at their token limit together), and the longest-first
        order makes the prompts admitted together about as long as each other: little padding."""
        own = [len(rows[i]) - P for i in prompts]
        hidden, filled = prefill_hidden(model, [rows[i][P:] for i in prompts], prefix, pad_id)
        logits[free] = last_logits(model, hidden, own)
        for big, small in zip(caches, filled):
            for j, (slot, size) in enumerate(zip(free, own)):
                big.k[slot, :, :size] = small.k[j, :, P:P + size]
                big.v[slot, :, :size] = small.v[j, :, P:P + size]
        for slot, i, size in zip(free, prompts, own):
            gen = None
            if temperature > 0:
                gen = torch.Generator(device=device).manual_seed(row_seed(seed, rows[i]))
            slots[slot] = _Slot(i, size, [], gen, _Lookup(rows[i]) if draft_tokens else None)

    while True:
        free = [k for k, s in enumerate(slots) if s is None][:len(waiting)]
        while free:  # the free slots take the next prompts, as many per prefill as PREFILL_TOKENS allows
            take, longest = 1, len(rows[waiting[-1]]) - P  # waiting ends with the longest
            while take < len(free) and (take + 1) * longest <= PREFILL_TOKENS:
                take += 1
            admit(free[:take], [waiting.pop() for _ in range(take)])
            free = free[take:]
        active = [k for k, s in enumerate(slots) if s is not None]
        if not active:
            return
        tokens = _sample(logits[active], [slots[k] for k in active], temperature, top_p)
        for k, tok in zip(active, tokens):
            if _append(slots[k], tok, stops, max_new_tokens, should_stop):
                yield slots[k].index, slots[k].new
                slots[k] = None
        running = [k for k, s in enumerate(slots) if s is not None]
        if not running:  # every row ended at this token: refill the slots, or stop
            if not waiting:
                return
            continue
        if not waiting and len(running) <= len(slots) // 2:  # the tail: keep only the rows still running
            keep = torch.tensor(running, device=device)
            for c in caches:
                c.k, c.v = c.k[keep], c.v[keep]
            slots, logits = [slots[k] for k in running], logits[keep]
            running = list(range(len(slots)))
        # One decode step for every row: its last token, then its drafts (greedy rows); only the
        # running rows' results are kept. A free slot computes throwaway tokens at slot 0 until it
        # is refilled (which rewrites its cache).
        drafts = {k: _draft(slots[k], draft_tokens, max_new_tokens) for k in running}
        B, T = len(slots), 1 + max(map(len, drafts.values()))
        fed = torch.full((B, T), pad_id, dtype=torch.long)
        pos = torch.zeros(B, dtype=torch.long)
        for k in running:
            fed[k, :1 + len(drafts[k])] = torch.tensor([slots[k].new[-1]] + drafts[k])
            pos[k] = slots[k].length
        S = int(pos.max()) + T
        key_mask = (torch.arange(S)[None, :] < pos[:, None] + T).long()  # each row's slots so far and the T new
        fed, pos, key_mask = fed.to(device), pos.to(device), key_mask.to(device)
        positions = P + pos[:, None] + torch.arange(T, device=device)  # positions count the prefix
        out = _run(model, caches, fed, key_mask, positions, pos)  # (B, T, vocab)
        if T == 1:
            logits = out[:, 0]
            for k in running:
                slots[k].length += 1
            continue
        choice, kept_at = out.argmax(-1).tolist(), [0] * B  # the model's greedy choice after each fed token
        for k in running:
            kept_at[k], finished = _keep_drafts(slots[k], drafts[k], choice[k], stops, max_new_tokens, should_stop)
            if finished:
                yield slots[k].index, slots[k].new
                slots[k] = None
            else:
                slots[k].length += 1 + kept_at[k]  # the fed token and the kept drafts are now in the cache
        logits = out[torch.arange(B, device=device), torch.tensor(kept_at, device=device)]  # after the last kept


def _keep_drafts(slot: _Slot, draft: list[int], choice: list[int], stops: set[int], max_new_tokens: int,
                 should_stop: Callable[[list[int]], bool] | None) -> tuple[int, bool]:
    """Check a row's drafts against ``choice`` (the model's greedy token after each fed token:
    choice[j] follows draft j - 1, choice[0] the row's last token). Draft j is kept while
    choice[j] is that draft, so every kept token is the model's own; the row's next token then
    comes from the logits after the last kept one. Returns (drafts kept, whether the row ended
    on one: a stop id or a stop string, exactly as without drafts)."""
    kept = 0
    while kept < len(draft) and choice[kept] == draft[kept]:
        kept += 1
        if _append(slot, draft[kept - 1], stops, max_new_tokens, should_stop):
            return kept, True
    return kept, False


def _append(slot: _Slot, token: int, stops: set[int], max_new_tokens: int,
            should_stop: Callable[[list[int]], bool] | None) -> bool:
    """Give a row its next token; whether the row has ended: a stop id (not kept), its token
    limit, or ``should_stop`` (a stop string)."""
    if token in stops:
        return True
    slot.new.append(token)
    if slot.lookup is not None:
        slot.lookup.ids.append(token)
    return len(slot.new) >= max_new_tokens or (should_stop is not None and should_stop(slot.new))


def _draft(slot: _Slot, draft_tokens: int, max_new_tokens: int) -> list[int]:
    """The row's guesses for this step: none for sampled rows, and at most as many as leave room
    for the model's own token after them within the row's limit (more could never be kept)."""
    room = min(draft_tokens, max_new_tokens - len(slot.new) - 1)
    return slot.lookup.draft(room) if slot.lookup is not None and room > 0 else []
