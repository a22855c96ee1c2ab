"""A released chat model rates in its own chat format; a rater fine-tuned here in our plain format.

humback.rating.rater_prompt chooses the layout and humback.inference.prompt_chat_format decides
which applies (--prompt-format auto|chat|plain). Checked with fake model calls (what text reaches
the model, the fallback's prompt), then end to end through curate.py on a tiny random Llama with
Llama-2's real tokenizer and Llama-2-chat's template (the 7B chat model the assignment names
cannot be downloaded here): each rated row is exactly what greedy decoding gives on the
``[INST]`` prompt, and the assignment preset rates with that chat model.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import curate
from data.pairs import Pair, read_pairs, write_jsonl_atomic
from data.templates import INSTRUCTION_HEADER, RATING_EXAMPLES, SEED_TAG, rating_instruction, rating_prompt
from humback.cli import UsageError
from humback.curation import read_rated
from humback.flags import curate_parser
from humback.inference import prompt_chat_format
from humback.presets import PRESETS, Preset, resolve_preset
from humback.rating import (RATER_STOPS, clean_rating, forced_score_prompt, logprob_scorer, rate, rater_prompt,
                            verdict_from_logprobs)
from model.chat import chat_format
from tests.model.test_chat import TEMPLATES, tiny_llama2_chat  # noqa: F401 (a fixture)
from tests.tiny import REPO

DEMO_SEED = REPO / "data" / "demo" / "seed.jsonl"
PAIRS = [Pair("a", "How do magnets work?", "Magnets attract iron because of aligned electron spins."),
         Pair("b", "Name a prime number.", "Seven is a prime number.")]


@pytest.mark.parametrize("template", ["llama2-chat", "smollm2"])
def test_rate_puts_the_table1_prompt_in_the_chat_template(tmp_path: Path, template: str) -> None:
    chat = chat_format(TEMPLATES[template])
    seen: dict[str, list[str]] = {"complete": [], "fallback": []}

    def complete(prompts: list[str]) -> list[str]:
        seen["complete"] += prompts
        return ["Looks right.\nScore: 4", "no verdict here"]

    def score_next(prompts: list[str]) -> list[dict[int, float]]:
        seen["fallback"] += prompts
        return [{1: -5.0, 2: -4.0, 3: -3.0, 4: -2.0, 5: -1.0} for _ in prompts]

    rate(PAIRS, complete, score_next, tmp_path / "rated.jsonl", k_shot=2, tag="seed", progress=False, chat=chat)
    if template == "smollm2":  # ChatML: the two demonstrations are earlier exchanges, then Table 1 alone
        demos = [(rating_instruction(ex.instruction, ex.answer, 0), f"{ex.reasoning}\nScore: {ex.score}")
                 for ex in RATING_EXAMPLES[:2]]
        want = [chat.render(rating_instruction(p.instruction, p.output, 0), history=demos) for p in PAIRS]
        assert all(w.count("<|im_start|>user\n") == 3 and w.count("<|im_start|>assistant\n") == 3 for w in want)
        assert "Score: 5<|im_end|>\n<|im_start|>user\n" in want[0]  # the first demonstration's answer, a turn
    else:  # Llama-2: one user turn, the demonstrations quoted before Table 1
        want = [chat.render(rating_instruction(p.instruction, p.output, 2)) for p in PAIRS]
        assert all(w.count("[INST]") == 1 and "Example 2:" in w for w in want)
    assert seen["complete"] == want
    assert all(INSTRUCTION_HEADER not in p and SEED_TAG not in p for p in want)  # no plain format, no tag line
    # The fallback continues the model's own reply inside the template: prompt, the template's
    # separator before a reply (Llama-2's space after [/INST]), its reasoning, "Score:".
    assert seen["fallback"] == [want[1] + chat.reply_separator + "no verdict here\nScore:"]
    assert chat.reply_separator == {"llama2-chat": " ", "smollm2": ""}[template]
    rows = read_rated(tmp_path / "rated.jsonl")
    assert [r["prompt_format"] for r in rows] == [chat.name] * 2
    assert [(r["score"], r["score_method"]) for r in rows] == [(4, "text"), (5, "logprob")]


def test_without_a_chat_format_the_prompt_is_the_plain_one(tmp_path: Path) -> None:
    seen: list[str] = []
    rate(PAIRS, lambda ps: seen.extend(ps) or ["Score: 3"] * len(ps), None, tmp_path / "r.jsonl", k_shot=1,
         tag="seed", progress=False)
    assert seen == [rating_prompt(p.instruction, p.output, 1, "seed") for p in PAIRS]
    assert {r["prompt_format"] for r in read_rated(tmp_path / "r.jsonl")} == {"plain"}
    assert rater_prompt("i", "o", 0, None, None) == rating_prompt("i", "o", 0, None)


def test_which_prompts_get_the_chat_format() -> None:
    llama2 = chat_format(TEMPLATES["llama2-chat"])
    chat_tok, plain_tok = SimpleNamespace(chat_format=llama2), SimpleNamespace(chat_format=None)
    assert prompt_chat_format(chat_tok, None) == llama2            # a chat model as released
    assert prompt_chat_format(chat_tok, "runs/m0/adapter") is None  # our adapter learned the plain format
    assert prompt_chat_format(plain_tok, None) is None              # a base model: no template
    assert prompt_chat_format(chat_tok, None, "plain") is None
    assert prompt_chat_format(chat_tok, "runs/m0/adapter", "chat") == llama2
    with pytest.raises(UsageError, match="--prompt-format chat: this model has no chat template"):
        prompt_chat_format(plain_tok, None, "chat")


def test_curate_py_rates_a_llama2_chat_model_in_its_inst_format(tiny_llama2_chat: Path, tmp_path: Path,  # noqa: F811
                                                                capsys: pytest.CaptureFixture) -> None:
    """curate.py --model CHAT (no adapter): every rater_output is what greedy decoding writes after
    the [INST] prompt, computed here independently; --prompt-format plain gives the plain prompt."""
    from model import generate, load_model
    pairs = read_pairs(DEMO_SEED)[:3]
    write_jsonl_atomic(tmp_path / "pairs.jsonl", pairs)
    common = ["--model", str(tiny_llama2_chat), "--dtype", "fp32", "--pairs", str(tmp_path / "pairs.jsonl"),
              "--k-shot", "1", "--max-new-tokens", "6", "--batch-size", "2", "--no-progress"]
    for layout in ("auto", "plain"):
        out = tmp_path / f"rated-{layout}.jsonl"
        assert curate.main(common + ["--out", str(out), "--curated", str(tmp_path / f"cur-{layout}.jsonl"),
                                     "--prompt-format", layout]) == 0
        assert f"prompt_format={'llama2' if layout == 'auto' else 'plain'}" in capsys.readouterr().out

    model, tok = load_model(tiny_llama2_chat, device="cpu")
    fmt = tok.chat_format
    for layout, prompt_of in (("auto", lambda p: fmt.render(rating_instruction(p.instruction, p.output, 1))),
                              ("plain", lambda p: rating_prompt(p.instruction, p.output, 1, None))):
        rows = read_rated(tmp_path / f"rated-{layout}.jsonl")
        prompts = [prompt_of(p) for p in pairs]
        assert [r["prompt_format"] for r in rows] == ["llama2" if layout == "auto" else "plain"] * 3
        assert [r["rater_output"] for r in rows] == generate(model, tok, prompts, max_new_tokens=6,
                                                             stop=list(RATER_STOPS))
        # Rows without a readable score were scored by the fallback on this same prompt + reasoning + "Score:".
        fallback = [(r, p) for r, p in zip(rows, prompts) if r["score_method"] == "logprob"]
        assert fallback  # a tiny random model writes no "Score: N"
        forced = [forced_score_prompt(p, clean_rating(r["rater_output"]), fmt if layout == "auto" else None)
                  for r, p in fallback]
        for (row, _), logprobs in zip(fallback, logprob_scorer(model, tok)(forced)):
            assert row["score"] == verdict_from_logprobs(logprobs)[0]
    assert tok.encode(fmt.render("x"), bos=tok.add_bos)[:4] == [1, 518, 25580, 29962]  # <s> ▁[ INST ]: one BOS


def test_the_llama2_fallback_rereads_the_reply_as_the_model_wrote_it(tiny_llama2_chat: Path) -> None:  # noqa: F811
    """The forced prompt's tokens are the prompt's, then the reply's as generation produces them
    (sentencepiece puts "▁" before a reply's first word: "▁The"). Without the space after [/INST]
    they would be "]", "The", a sequence the model never wrote."""
    from model import load_model
    _, tok = load_model(tiny_llama2_chat, device="cpu")
    fmt = tok.chat_format
    prompt = fmt.render(rating_instruction(PAIRS[0].instruction, PAIRS[0].output, 1))
    for reply, want in (("The pair fits.\nScore: 9", "The pair fits.\nScore:"), ("Score: ten", "Score:")):
        forced = tok.encode(forced_score_prompt(prompt, reply, fmt), bos=tok.add_bos)
        assert forced == tok.encode(prompt, bos=tok.add_bos) + tok.encode(want)
        assert tok.encode(prompt + want, bos=tok.add_bos) != forced  # glued on, as before this fix


def resolved(*flags: str) -> Preset:
    """The preset pipeline.py would run with these flags."""
    from humback.flags import pipeline_parser
    return resolve_preset(pipeline_parser().parse_args(["--workdir", "w", *flags]))


def flag_values(flags: list[str], name: str) -> list[str]:
    """Every value given to flag ``name`` in ``flags``, in order (argparse keeps the last)."""
    return [flags[i + 1] for i, f in enumerate(flags) if f == name]


def test_the_assignment_preset_rates_with_llama2_7b_chat() -> None:
    assignment = resolved("--preset", "assignment")
    assert assignment.rater_model == "meta-llama/Llama-2-7b-chat-hf" and assignment.quantize == "nf4"
    assert resolved("--preset", "assignment", "--rater-model", "m0").rater_model is None  # the paper's M0
    assert resolved("--preset", "assignment", "--rater-model", "qwen2.5-coder-1.5b-instruct").rater_model == (
        "qwen2.5-coder-1.5b-instruct")
    assert resolved("--preset", "paper").rater_model is None and resolved("--preset", "demo").rater_model is None


def test_evaluate_py_measures_a_chat_rater_in_its_format(tiny_llama2_chat: Path, tmp_path: Path) -> None:  # noqa: F811
    """evaluate.py --rater base on a chat model: its row says llama2 in eval.json and eval.md, and every
    expected score (the AUC's finer signal) was read after the [INST] prompt, not the plain one."""
    import evaluate
    from model import load_model
    heldout = str(REPO / "data" / "demo" / "heldout.jsonl")
    common = ["--model", str(tiny_llama2_chat), "--dtype", "fp32", "--device", "cpu", "--rater", "base",
              "--heldout", heldout, "--n", "3", "--k-shot", "1", "--rating-tokens", "4", "--batch-size", "4",
              "--no-progress", "--no-plots"]
    for layout in ("auto", "plain"):
        assert evaluate.main(common + ["--prompt-format", layout, "--out", str(tmp_path / layout)]) == 0
    model, tok = load_model(tiny_llama2_chat, device="cpu")
    scorer = logprob_scorer(model, tok)
    for layout, name, chat, prompt_of in (
            ("auto", "llama2", tok.chat_format,
             lambda r: tok.chat_format.render(rating_instruction(r["instruction"], r["output"], 1))),
            ("plain", "plain", None, lambda r: rating_prompt(r["instruction"], r["output"], 1, None))):
        (row,) = json.loads((tmp_path / layout / "eval.json").read_text())["rater"]
        assert (row["prompt_format"], row["tag"]) == (name, "none")
        assert f"| base | {name} |" in (tmp_path / layout / "eval.md").read_text()
        rated = read_rated(tmp_path / layout / "rater_base.jsonl")
        forced = [forced_score_prompt(prompt_of(r), clean_rating(r["rater_output"]), chat) for r in rated]
        expected = [verdict_from_logprobs(lp)[2] for lp in scorer(forced)]
        assert [r["expected_score"] for r in rated] == pytest.approx(expected, abs=1e-3)


def test_evaluate_rater_reads_expected_scores_after_the_chat_prompt(tmp_path: Path) -> None:
    """Rows with a readable score get their expected score in evaluate_rater's own loop: on the
    same chat prompt the rater answered."""
    from humback.measures import evaluate_rater
    chat = chat_format(TEMPLATES["llama2-chat"])
    answered: list[str] = []
    forced: list[str] = []

    def complete(prompts: list[str]) -> list[str]:
        answered.extend(prompts)
        return ["Fine.\nScore: 3"] * len(prompts)

    def score_next(prompts: list[str]) -> list[dict[int, float]]:
        forced.extend(prompts)
        return [{s: -float(s) for s in range(1, 6)} for _ in prompts]

    pairs = read_pairs(DEMO_SEED)[:3]
    evaluate_rater(pairs, complete, score_next, tmp_path / "rated.jsonl", k_shot=1, tag=None, chat=chat)
    assert forced and all(p.startswith("[INST] ") for p in answered)
    assert sorted(forced) == sorted(prompt + " Fine.\nScore:" for prompt in answered)  # Llama-2's reply space


def test_a_tag_the_chat_template_cannot_hold_is_said_to_be_unused(tiny_llama2_chat: Path, tmp_path: Path,  # noqa: F811
                                                                  capsys: pytest.CaptureFixture) -> None:
    """--tag seed on a rater prompted in its chat template: no tag line (the template has no place
    for it), and a note on stderr says so; in the plain layout the tag is used, without a note."""
    write_jsonl_atomic(tmp_path / "pairs.jsonl", read_pairs(DEMO_SEED)[:2])
    common = ["--model", str(tiny_llama2_chat), "--dtype", "fp32", "--pairs", str(tmp_path / "pairs.jsonl"),
              "--k-shot", "0", "--max-new-tokens", "2", "--no-progress", "--tag", "seed"]
    for layout, tag, note in (("auto", "none", True), ("plain", "seed", False)):
        assert curate.main(common + ["--out", str(tmp_path / f"r-{layout}.jsonl"),
                                     "--curated", str(tmp_path / f"c-{layout}.jsonl"), "--prompt-format", layout]) == 0
        out, err = capsys.readouterr()
        assert f"tag={tag}, prompt_format=" in out
        assert ("note: --tag seed is not used by the rater: it is prompted in its chat template" in err) == note


def test_likelihood_rating_refuses_a_chat_prompt_format(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--method likelihood has no rating prompt to lay out: --prompt-format chat with it is refused while
    the flags are parsed, by curate.py and by the pipeline that would pass them on."""
    import pipeline
    flags = ["--method", "likelihood", "--prompt-format", "chat"]
    with pytest.raises(SystemExit) as e:
        curate.main(["--model", "m", "--pairs", "p", "--out", "o", "--curated", "c"] + flags)
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--workdir", str(tmp_path / "run"), "--curate-args", " ".join(flags)])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    want = "--prompt-format chat lays out the rating prompt, and --method likelihood has none"
    assert err[0].startswith("curate.py: error: " + want) and err[0].endswith("(see curate.py --help)")
    assert err[1].startswith("pipeline.py: error: --curate-args: curate.py: " + want)
    assert not (tmp_path / "run").exists()
    # each flag alone is fine
    for ok in (["--method", "likelihood"], ["--prompt-format", "chat"]):
        args = curate_parser().parse_args(["--model", "m", "--pairs", "p", "--out", "o", "--curated", "c"] + ok)
        assert args.method in ("prompt", "likelihood")


def test_a_chat_rater_gets_the_presets_rating_budget() -> None:
    """The demo preset sizes its 48 rating tokens for M0; a --rater-model (a released chat model,
    reasoning at its own length) gets rater_model_tokens in curate and evaluate instead, and the
    user's --curate-args / --eval-args still come after it (the last flag wins in argparse)."""
    def preset(*flags: str) -> Preset:
        return resolved("--preset", "demo", *flags)
    m0 = preset()
    assert flag_values(m0.curate, "--max-new-tokens") == ["48"]
    assert flag_values(m0.evaluate, "--rating-tokens") == ["48"]
    chat = preset("--rater-model", "qwen2.5-coder-1.5b-instruct")
    assert flag_values(chat.curate, "--max-new-tokens") == ["128"]
    assert flag_values(chat.evaluate, "--rating-tokens") == ["128"]
    assert len(chat.curate) == len(m0.curate) and len(chat.evaluate) == len(m0.evaluate)  # replaced in place
    by_m0 = preset("--rater-model", "m0")  # M0 keeps the preset's budget
    assert by_m0.curate == m0.curate and by_m0.evaluate == m0.evaluate
    mine = preset("--rater-model", "qwen2.5-coder-1.5b-instruct", "--curate-args=--max-new-tokens 64",
                  "--eval-args=--rating-tokens 32")
    assert flag_values(mine.curate, "--max-new-tokens") == ["128", "64"]
    assert flag_values(mine.evaluate, "--rating-tokens") == ["128", "32"]
    assert preset("--curate-args=--batch-size 4").curate == m0.curate + ["--batch-size", "4"]


def test_evaluate_rates_with_the_demonstrations_curate_used() -> None:
    """--k-shot (or the preset's k) reaches curate and evaluate alike, with M0 or a --rater-model:
    the preset's evaluate and curate flags do not pin a k of their own after it."""
    from humback.pipeline_run import Run

    def preset(*flags: str) -> Preset:
        return resolved("--preset", "demo", *flags)

    def eval_k(pre: Preset) -> str:  # the last --k-shot evaluate.py gets wins in argparse
        return flag_values(Run(None, pre, Path("w"), [], None, 0).eval_flags, "--k-shot")[-1]
    assert preset().k_shot == 2 and eval_k(preset()) == "2"
    chat = preset("--rater-model", "qwen2.5-coder-1.5b-instruct")
    assert chat.k_shot == 2 and eval_k(chat) == "2"
    mine = preset("--rater-model", "qwen2.5-coder-1.5b-instruct", "--k-shot", "1")
    assert mine.k_shot == 1 and eval_k(mine) == "1"
    assert eval_k(preset("--k-shot", "4")) == "4"  # M0 too: evaluate follows curate
    assert resolved("--preset", "assignment").k_shot == 3
    for name in PRESETS:  # curate gets pre.k_shot (pipeline.py's curate stage): no preset may pin its own after it
        assert "--k-shot" not in PRESETS[name].curate
