"""The inference engine (model/engine.py) is exact: every prompt gets the tokens it gets alone.

Alone means the plain static loop ``generate_tokens`` on that one prompt (fp32, greedy), on a
tiny random Llama and on the real stories260K. The engine is checked with the shared prefix,
with slot refill (fewer slots than prompts), with both, with mixed prompt lengths, and with EOS
and stop strings ending rows mid-batch; the two scorers against the plain full forward pass; and
sampling against the batch size and the order of the prompts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import engine, generate, load_model
from model.sampling import (generate_stream, generate_tokens, left_pad, next_token_logprobs, stop_checker,
                            token_logprobs)
from tests.tiny import SHARED, make_tiny

PREFIX = ("Below is an instruction and a response. Rate how well the response answers the instruction, "
          "on a scale of 1 to 5, and end with a line Score: N.\n\n")
ENDINGS = ["Instruction: Why is the sky blue?", "Instruction: Name a prime.\nResponse: 7",
           "Instruction: Tell me a story about a dragon and a knight who became friends.",
           "Instruction: 2+2?", "Instruction: What is the capital of France, and why is it famous?",
           "Instruction: Hi", "Instruction: Describe the water cycle in three steps for a child."]


@pytest.fixture(scope="module")
def tiny():
    import tempfile
    from pathlib import Path
    folder = make_tiny(Path(tempfile.mkdtemp()) / "tiny", std=0.1)
    return load_model(folder, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def stories():
    if not (SHARED / "models/stories260K").is_dir():  # a clone without ../shared: skip, as the other tests do
        pytest.skip("../shared/models/stories260K is absent")
    return load_model(SHARED / "models/stories260K", dtype=torch.float32, device="cpu")


def prompt_rows(tok) -> list[list[int]]:
    return [tok.encode(PREFIX + e, bos=tok.add_bos) for e in ENDINGS]


def alone(model, tok, rows, max_new, stop_ids=()):
    return [generate_tokens(model, [r], max_new, tok.pad_id, stop_ids)[0] for r in rows]


def run_engine(model, tok, rows, max_new, stop_ids=(), **kw):
    out = dict(engine.stream(model, rows, max_new, tok.pad_id, stop_ids, **kw))
    return [out[i] for i in range(len(rows))]


@pytest.mark.parametrize("which", ["tiny", "stories"])
@pytest.mark.parametrize("share_prefix, n_slots", [(True, 16), (False, 3), (True, 3), (True, 1)],
                         ids=["prefix", "refill", "prefix+refill", "one-slot"])
def test_engine_gives_every_prompt_its_tokens_alone(which, share_prefix, n_slots, request):
    model, tok = request.getfixturevalue(which)
    rows = prompt_rows(tok)
    assert engine.shared_prefix_len(rows) >= engine.MIN_PREFIX  # the prefix cache is really used
    assert len({len(r) for r in rows}) == len(rows)  # mixed prompt lengths
    expected = alone(model, tok, rows, 20)
    assert run_engine(model, tok, rows, 20, n_slots=n_slots, share_prefix=share_prefix) == expected


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_eos_mid_batch_ends_rows_at_different_steps(which, request):
    model, tok = request.getfixturevalue(which)
    rows = prompt_rows(tok)
    free = alone(model, tok, rows, 20)
    # a token some row produces part-way: as a stop id it ends rows at different steps
    stop = next(t for out in free for t in out[3:])
    expected = alone(model, tok, rows, 20, [stop])
    assert len({len(x) for x in expected}) > 1 and any(len(x) < 20 for x in expected)
    assert run_engine(model, tok, rows, 20, [stop], n_slots=3) == expected


def test_stop_strings_cut_rows_as_alone_and_are_checked_incrementally(tiny, monkeypatch):
    model, tok = tiny
    prompts = [PREFIX + e for e in ENDINGS]
    free = [generate(model, tok, [p], max_new_tokens=24)[0] for p in prompts]
    stop = next(t[len(t) // 2:len(t) // 2 + 2] for t in free if len(t.strip()) > 6)  # from some row's middle
    expected = [generate(model, tok, [p], max_new_tokens=24, stop=[stop])[0] for p in prompts]
    assert any(len(e) < len(f) for e, f in zip(expected, free))

    lengths = []
    real_decode = tok.decode

    def counting_decode(ids, *a, **k):
        lengths.append(len(ids))
        return real_decode(ids, *a, **k)
    monkeypatch.setattr(tok, "decode", counting_decode)
    got = generate(model, tok, prompts, max_new_tokens=24, stop=[stop], batch_size=3)
    assert got == expected
    # during decoding only a window of a row's tokens is decoded; whole outputs once, at the end
    window = len(stop) + 8
    assert sum(1 for n in lengths if n > window) <= len(prompts)


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_next_token_logprobs_with_the_prefix_equal_the_full_forward(which, request):
    model, tok = request.getfixturevalue(which)
    rows = prompt_rows(tok)
    prompts = [PREFIX + e for e in ENDINGS]
    got = next_token_logprobs(model, tok, prompts, batch_size=3)
    with torch.no_grad():  # the plain computation: left-padded full prompts, one forward
        ids, mask = left_pad(rows, tok.pad_id, torch.device("cpu"))
        want = F.log_softmax(model(ids, mask)[:, -1].float(), -1)
    # what the rater's fallback reads: the probabilities (of "1".."5"), within 1e-5; the log-probs
    # themselves (down to -25 here) agree to float32 rounding
    assert (got.exp() - want.exp()).abs().max().item() < 1e-5
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_token_logprobs_with_the_prefix_equal_the_full_forward(which, request):
    model, tok = request.getfixturevalue(which)
    prompts = [PREFIX + e + "\nResponse:" for e in ENDINGS]
    continuations = [" It is because of scattering.", " Seven.", "", " Once upon a time", " 4", " Hello!", " Rain."]
    got = token_logprobs(model, tok, prompts, continuations, batch_size=3)
    for p, c, g in zip(prompts, continuations, got):
        pi, ci = tok.encode(p, bos=tok.add_bos), tok.encode(c)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([pi + ci])).float(), -1)[0]
        want = torch.stack([logp[len(pi) - 1 + j, t] for j, t in enumerate(ci)]) if ci else torch.empty(0)
        assert g.shape == want.shape and (g - want).abs().max().item() < 1e-5 if ci else g.numel() == 0


def test_sampled_outputs_do_not_depend_on_the_batch(tiny):
    model, tok = tiny
    prompts = [PREFIX + e for e in ENDINGS] * 3  # 21 prompts, repeats included
    runs = {b: generate(model, tok, prompts, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3, batch_size=b)
            for b in (1, 3, 16)}
    assert runs[1] == runs[3] == runs[16]
    assert runs[1][:7] == runs[1][7:14]  # a prompt's randomness is its own: the same prompt, the same text
    assert len(set(runs[1][:7])) > 1
    # ... and not on the order or the company of the other prompts
    assert generate(model, tok, prompts[::-1][:5], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3,
                    batch_size=2) == runs[1][::-1][:5]
    other_seed = generate(model, tok, prompts[:7], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=4)
    assert other_seed != runs[1][:7]


def test_compiled_path_seeds_rows_the_same_way(tiny):
    """The static loop with one generator per row (the compiled path's) samples what the engine does."""
    model, tok = tiny
    rows = prompt_rows(tok)[:4]
    gens = [torch.Generator().manual_seed(engine.row_seed(5, r)) for r in rows]
    static = generate_tokens(model, rows, 12, tok.pad_id, (), 0.8, 0.9, gens)
    assert static == run_engine(model, tok, rows, 12, temperature=0.8, top_p=0.9, seed=5, n_slots=2)


def test_stream_yields_rows_as_they_finish(tiny):
    model, tok = tiny
    prompts = [PREFIX + e for e in ENDINGS]
    order = [i for i, _ in generate_stream(model, tok, prompts, max_new_tokens=12, batch_size=2)]
    assert sorted(order) == list(range(len(prompts)))
    with pytest.raises(ValueError, match="empty prompt"):
        list(engine.stream(model, [[1, 2], []], 4, tok.pad_id))
    with pytest.raises(ValueError, match="draft_tokens must be 0"):
        list(engine.stream(model, [[1, 2]], 4, tok.pad_id, draft_tokens=-1))


def test_kept_prefix_is_computed_once_and_outputs_stay_those_alone(tiny, monkeypatch):
    """Inside keep_prefixes, calls after the same prefix (a rating run's chunks, then its fallback)
    prefill it once, a shorter shared prefix is a slice of the kept one, and every output is the one
    each prompt gets alone; outside the block (or after it) each call computes its own again."""
    model, tok = tiny
    rows = prompt_rows(tok)
    computed = []
    real = engine.Prefix.compute.__func__

    def counting(cls, m, ids):
        computed.append(len(ids))
        return real(cls, m, ids)
    monkeypatch.setattr(engine.Prefix, "compute", classmethod(counting))
    expected = alone(model, tok, rows, 12)
    P = engine.shared_prefix_len(rows)
    with engine.keep_prefixes(model):
        assert run_engine(model, tok, rows[:4], 12) == expected[:4]
        assert run_engine(model, tok, rows[4:], 12) == expected[4:]
        got = next_token_logprobs(model, tok, [PREFIX + e for e in ENDINGS], batch_size=3)
        # three calls, one prefill of the prefix (rows[4:] share one more token: only that one is run)
        assert computed == [P] and len(model._kept_prefix[0].ids) == engine.shared_prefix_len(rows[4:]) > P
        short = engine.prefix_for(model, rows[0][:P - 3])  # a beginning of the kept one: its slice
        assert computed == [P] and [k.shape[2] for k, _ in short.kv] == [P - 3] * len(short.kv)
        full = real(engine.Prefix, model, rows[0][:P - 3])
        assert all(torch.allclose(a, b, atol=1e-6) for (a, _), (b, _) in zip(short.kv, full.kv))
        other = [tok.encode("A different start of every prompt, long enough. " + e, bos=tok.add_bos) for e in ENDINGS]
        run_engine(model, tok, other, 2)
        assert len(computed) == 2 and model._kept_prefix[0].ids == other[0][:engine.shared_prefix_len(other)]
    with torch.no_grad():
        ids, mask = left_pad(rows, tok.pad_id, torch.device("cpu"))
        want = F.log_softmax(model(ids, mask)[:, -1].float(), -1)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    run_engine(model, tok, rows, 2)
    run_engine(model, tok, rows, 2)
    assert len(computed) == 4 and getattr(model, "_kept_prefix", None) is None  # nothing kept outside


@pytest.mark.parametrize("which", ["tiny", "stories"])
@pytest.mark.parametrize("budget", [0, 40, 10_000], ids=["one-at-a-time", "in-pairs", "all-at-once"])
def test_prompts_prefilled_together_get_their_tokens_alone(which, budget, request, monkeypatch):
    """Free slots take the next prompts (longest first) in prefills of up to PREFILL_TOKENS padded
    tokens; however they are grouped, every prompt gets what it gets alone. The decode caches hold
    each row's own tokens only, the shared prefix once beside them (KVCache.prefix)."""
    model, tok = request.getfixturevalue(which)
    rows = prompt_rows(tok)
    P = engine.shared_prefix_len(rows)
    monkeypatch.setattr(engine, "PREFILL_TOKENS", budget)
    blocks, caches, shapes = [], [], []
    real_prefill, real_caches = engine.prefill_hidden, engine._caches

    def counting(m, suffixes, prefix, pad_id, extra=0):
        blocks.append([len(s) for s in suffixes])
        return real_prefill(m, suffixes, prefix, pad_id, extra)

    def keeping(*a, **kw):
        caches.append(real_caches(*a, **kw))
        shapes.append(tuple(caches[-1][0].k.shape))  # as made (the tail's compaction replaces the tensors)
        return caches[-1]
    monkeypatch.setattr(engine, "prefill_hidden", counting)
    monkeypatch.setattr(engine, "_caches", keeping)
    expected = alone(model, tok, rows, 15)
    blocks.clear()
    caches.clear()
    shapes.clear()
    assert run_engine(model, tok, rows, 15, n_slots=4) == expected
    assert sorted(n for b in blocks for n in b) == sorted(len(r) - P for r in rows)  # each prompt once
    assert blocks[0][0] == max(len(r) for r in rows) - P  # the longest first
    assert all(len(b) * max(b) <= budget for b in blocks if len(b) > 1)
    if budget == 0:
        assert all(len(b) == 1 for b in blocks)
    if budget == 10_000:
        assert [len(b) for b in blocks][0] == 4  # the four free slots filled by one prefill
    decode = [(c, n) for c, n in zip(caches, shapes) if c[0].prefix is not None]  # 4 slots of own tokens
    assert len(decode) == 1 and decode[0][0][0].prefix[0].shape[2] == P
    (_, shape), = decode  # room for the longest prompt's own tokens and 15 new ones
    assert shape[:3] == (4, shape[1], max(len(r) for r in rows) - P + 15)


def test_lookup_drafts_what_followed_the_longest_recent_match():
    """A draft copies what followed the most recent earlier occurrence of the row's last 3 tokens
    (then 2, then 1); nothing when the last token is new; the table grows with the row."""
    look = engine._Lookup([5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7])
    assert look.draft(3) == [1, 2, 6]  # "6 7" last occurred before at 5..6, followed by 1 2 6
    look.ids += [1, 2]
    assert look.draft(2) == [6, 7]  # "7 1 2" occurred before at 6..8
    look.ids.append(99)
    assert look.draft(4) == []  # 99 is new
    assert engine._Lookup([4, 4, 4]).draft(5) == [4]  # the match may run into the tail itself


@pytest.mark.parametrize("which", ["tiny", "stories"])
@pytest.mark.parametrize("share_prefix", [True, False], ids=["prefix", "no-prefix"])
def test_drafted_rows_get_their_tokens_alone_in_fewer_steps(which, share_prefix, request, monkeypatch):
    """With prompt-lookup drafts a greedy row keeps the guesses the model would have chosen, so
    every prompt gets what it gets alone (fp32), with refill and EOS mid-batch, after a shared
    prefix kept once or without one; and drafts are really kept: fewer decode steps."""
    model, tok = request.getfixturevalue(which)
    rows = prompt_rows(tok)
    steps = []  # tokens fed per row in each decode step
    real = engine._run

    def counting(m, caches, ids, mask, positions, start, *a, **k):
        if isinstance(start, torch.Tensor):  # a decode step (a prefill starts at one int position)
            steps.append(ids.shape[1])
        return real(m, caches, ids, mask, positions, start, *a, **k)
    monkeypatch.setattr(engine, "_run", counting)
    free = alone(model, tok, rows, 40)
    stop = next(t for out in free for t in out[3:])
    for stop_ids in ((), (stop,)):
        expected = alone(model, tok, rows, 40, stop_ids)
        counts = {}
        for k in (0, 1, 3):
            steps.clear()
            assert run_engine(model, tok, rows, 40, stop_ids, n_slots=3, draft_tokens=k,
                              share_prefix=share_prefix) == expected
            counts[k] = len(steps)
            assert max(steps) <= 1 + k
        assert any(t > 1 for t in steps) and counts[3] < counts[0]  # drafts were fed, and kept: fewer steps


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_drafted_rows_stop_at_stop_strings_as_alone(which, request):
    """A stop string ends a drafted row at the same token as alone: compared on the token ids the
    engine returns (the text is cut at the stop string afterwards, which would hide a late stop)."""
    model, tok = request.getfixturevalue(which)
    rows = prompt_rows(tok)
    free = [tok.decode(ids) for ids in alone(model, tok, rows, 30)]
    stop = next(t[len(t) // 2:len(t) // 2 + 2] for t in free if len(t.strip()) > 6)
    should_stop = stop_checker(tok, [stop])
    expected = [generate_tokens(model, [r], 30, tok.pad_id, should_stop=should_stop)[0] for r in rows]
    assert any(len(e) < 30 for e in expected)
    assert run_engine(model, tok, rows, 30, n_slots=3, should_stop=should_stop, draft_tokens=3) == expected
    prompts = [PREFIX + e for e in ENDINGS]
    # sampled rows never draft: the same text as without the option
    sampled = dict(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=16, batch_size=3)
    assert generate(model, tok, prompts, draft_tokens=3, **sampled) == generate(model, tok, prompts, **sampled)


def test_keep_drafts_keeps_the_model_s_choices_and_ends_rows_as_without_drafts():
    """The check of one row's drafts, on made-up choices: kept while the model chose them; a kept
    stop id or stop string ends the row exactly where one token at a time would."""
    def slot():
        return engine._Slot(0, 5, [7], None, engine._Lookup([1, 2, 7]))
    s = slot()
    assert engine._keep_drafts(s, [3, 4, 5], [3, 4, 9, 0], set(), 10, None) == (2, False)
    assert s.new == [7, 3, 4] and s.lookup.ids == [1, 2, 7, 3, 4]  # the next token comes from choice[2]
    s = slot()
    assert engine._keep_drafts(s, [3, 2, 5], [3, 2, 5, 0], {2}, 10, None) == (2, True)
    assert s.new == [7, 3]  # the stop id ends the row and is not part of its output
    s = slot()
    assert engine._keep_drafts(s, [3, 4, 5], [3, 4, 5, 0], set(), 10, lambda new: new[-1] == 4) == (2, True)
    assert s.new == [7, 3, 4]
    s = slot()
    assert engine._keep_drafts(s, [3, 4], [8, 4, 0], set(), 10, None) == (0, False) and s.new == [7]


def test_drafts_leave_room_for_the_model_s_token_within_the_limit():
    s = engine._Slot(0, 5, [3, 6, 1], None, engine._Lookup([5, 1, 2, 3, 4, 3, 6, 1]))
    assert engine._draft(s, 3, 10) == [2, 3, 4]  # what followed the earlier "1"
    assert engine._draft(s, 3, 6) == [2, 3]  # 3 new, limit 6: two drafts and the model's own token
    assert engine._draft(s, 3, 4) == []
    assert engine._draft(engine._Slot(0, 5, [1], torch.Generator(), None), 3, 10) == []  # sampled: none
