"""Every script's command line: one parser builder per command, each flag with its help.

The scripts parse their flags here, and so does ``pipeline.py`` for the flags it passes on
(``--train-args``, ``--augment-args``, ``--curate-args``, ``--eval-args``): a flag, its type and
its allowed values are written once, and a value the script would refuse is refused the same way
when the pipeline passes it. Each builder takes the script's docstring as the ``--help`` text.

============================  ==============  =======================================
parser                        script          runs
============================  ==============  =======================================
:func:`train_parser`          ``train.py``    :func:`humback.training.run`
:func:`generate_parser`       ``generate.py`` :func:`humback.generation.run`
:func:`curate_parser`         ``curate.py``   :func:`humback.curation.run`
:func:`evaluate_parser`       ``evaluate.py`` :func:`humback.evaluation.run`
:func:`pipeline_parser`       ``pipeline.py`` the script itself (its stages call the four above)
============================  ==============  =======================================
"""
from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Callable

from data.guanaco import EVAL_SPEC as DEFAULT_HELDOUT
from humback.cli import DEFAULT_MODEL, add_compile_flag, add_model_flags
from humback.presets import PRESETS, STAGES, Preset

# ------------------------------------------------------------------ checked values
# Every numeric flag has one of these as its argparse ``type``, so a value the run could not use
# (a negative batch size, a NaN temperature, a top-p of 2) is refused while the flags are parsed:
# one line naming the flag and the allowed range, exit code 2, before any model is loaded.


class FlagError(ValueError):
    """A flag value a parser refused, when the parser was asked to raise rather than exit
    (:func:`check_pipeline_flags` checks the flags the pipeline will pass on this way)."""


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``PROG: error: MESSAGE (see PROG --help)``,
    instead of the usage block and the message. With ``raise_errors`` it raises :class:`FlagError`
    instead of exiting, for a caller that reports the error in its own name."""

    def __init__(self, *args, raise_errors: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.raise_errors = raise_errors
        # Checks of flag combinations, run after parsing: each returns an error message or None.
        # They live on the parser so that every caller (the script, the pipeline checking the flags
        # it will pass on) refuses the same combinations.
        self.checks: list[Callable[[argparse.Namespace], str | None]] = []

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        for check in self.checks:
            if (message := check(parsed)) is not None:
                self.error(message)
        return parsed

    def error(self, message: str):  # type: ignore[override]
        if self.raise_errors:
            raise FlagError(f"{self.prog}: {message}")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def number_in(low: float, high: float = math.inf, low_open: bool = False,
              high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from ``low`` to ``high`` (each end
    excluded when its ``*_open`` is set; ``high=inf``: no upper end). NaN and inf are refused."""
    span = (("(" if low_open else "[") + f"{low:g}, " + ("inf)" if high == math.inf else
                                                          f"{high:g}" + (")" if high_open else "]")))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text!r}") from None
        inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text}")
        return value
    return parse


POSITIVE = int_at_least(1)  # counts: batch sizes, token limits, steps, sample sizes
NON_NEGATIVE = int_at_least(0)  # "every N steps" where 0 means never, warmup steps
TEMPERATURE = number_in(0.0)  # 0 = greedy
TOP_P = number_in(0.0, 1.0, low_open=True)  # the nucleus keeps at least the top token


def _parser(prog: str, description: str | None, raise_errors: bool = False) -> FlagParser:
    # prog is fixed, so that a flag the pipeline passes on is refused in the script's name
    return FlagParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                      raise_errors=raise_errors)


def train_parser(description: str | None = None, raise_errors: bool = False) -> argparse.ArgumentParser:
    """train.py: LoRA/QLoRA fine-tuning, either direction."""
    from lora.finetune import TrainConfig  # lazy: the other parsers need no torch
    defaults = TrainConfig()
    p = _parser("train.py", description, raise_errors)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training pairs: a JSONL of {instruction, output} (or any "
                   "'kind:path' spec data.readers understands, e.g. guanaco:FILE)")
    g.add_argument("--direction", choices=["forward", "backward"], default="forward",
                   help="forward: learn output given instruction; backward: learn instruction given output")
    g.add_argument("--tag", choices=["seed", "augmented", "none"], default="none",
                   help="forward only: the paper's tag line before the instruction (seed = 'Answer in the style "
                        "of an AI Assistant.', augmented = 'Answer with knowledge from web search.'); a pair's "
                        "own meta.tag, when present, wins")
    g.add_argument("--eval-data", default=None, help="held-out pairs for the eval loss (default: --eval-frac of --data)")
    g.add_argument("--eval-frac", type=number_in(0.0, 1.0, high_open=True), default=0.05, help="share of --data held out when no --eval-data (default 0.05)")
    g.add_argument("--max-len", type=int_at_least(2), default=defaults.max_len,
                   help=f"tokens per example; longer ones are truncated keeping >= half for the target (default {defaults.max_len})")
    add_model_flags(p, adapter=False, training=True)
    g = p.add_argument_group("LoRA (defaults: r=8, alpha=32, dropout=0.05 on q/k/v/o; --qlora: r=64, alpha=16, all linears, lr 2e-4)")
    g.add_argument("--qlora", action="store_true", help="use the QLoRA recipe for r/alpha/targets/lr (explicit flags still win)")
    g.add_argument("--r", "--lora-r", type=POSITIVE, default=None, dest="r",
                   help=f"LoRA rank (default {defaults.r}); spell it --lora-r under torchrun, whose own parser "
                        "takes --r for an abbreviation of its flags")
    g.add_argument("--alpha", type=number_in(0.0, low_open=True), default=None, help=f"LoRA alpha; the update is scaled by alpha/r (default {defaults.alpha})")
    g.add_argument("--dropout", type=number_in(0.0, 1.0, high_open=True), default=None, help=f"dropout on the LoRA input (default {defaults.dropout})")
    g.add_argument("--targets", default=None, help="comma-separated projections to adapt (q_proj,k_proj,v_proj,o_proj,"
                   "gate_proj,up_proj,down_proj) or all-linear (default q,k,v,o)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=number_in(0.0, low_open=True), default=None, help=f"peak learning rate (default {defaults.lr})")
    g.add_argument("--epochs", type=POSITIVE, default=defaults.epochs, help=f"passes over the data (default {defaults.epochs})")
    g.add_argument("--max-steps", type=POSITIVE, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=POSITIVE, default=defaults.batch_size, help=f"examples per micro-batch (default {defaults.batch_size})")
    g.add_argument("--grad-accum", type=POSITIVE, default=defaults.grad_accum, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--warmup-steps", type=NON_NEGATIVE, default=defaults.warmup_steps, help=f"linear warmup steps (default {defaults.warmup_steps})")
    g.add_argument("--schedule", choices=["cosine", "linear"], default=defaults.schedule, help="decay after warmup (default cosine)")
    g.add_argument("--weight-decay", type=number_in(0.0), default=defaults.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--clip", type=number_in(0.0, low_open=True), default=defaults.clip, help="gradient-norm clipping (default 1.0)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--no-autocast", action="store_true", help="disable bf16 autocast (on by default where supported)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=defaults.seed, help="seed for LoRA init, data order, dropout (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=defaults.out_dir, help=f"run folder (default {defaults.out_dir})")
    g.add_argument("--eval-every", type=NON_NEGATIVE, default=defaults.eval_every, help="eval loss every N steps (0 = only at the end)")
    g.add_argument("--save-every", type=NON_NEGATIVE, default=defaults.save_every, help="checkpoint every N steps (0 = never)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="after training, push the adapter + a model card to this hub repo (token from HF_TOKEN "
                        "or the login cache); the upload folder is written to OUT/hub-upload first")
    return p


def generate_parser(description: str | None = None, raise_errors: bool = False) -> argparse.ArgumentParser:
    """generate.py: prompts, self-augmentation or predictions (exactly one mode)."""
    p = _parser("generate.py", description, raise_errors)
    mode = p.add_argument_group("mode (give exactly one)").add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                      help="prompt text; repeat the flag to generate for several prompts in one batch")
    mode.add_argument("--unlabelled", default=None, metavar="SPEC",
                      help="self-augmentation source: unlabelled texts (any data.readers spec; labelled data such "
                           "as 'lima:GAIR/lima' loses its instructions); needs --out")
    mode.add_argument("--predict", default=None, metavar="TEST",
                      help="test set to answer (homework CSV id,instruction,output, or any spec with instructions); "
                           "writes --out as CSV id,instruction,output")
    add_model_flags(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=None,
                   help="tokens to generate per prompt (default: 64 for --prompt and self-augmentation, "
                        "512 for --predict)")
    g.add_argument("--temperature", type=TEMPERATURE, default=None,
                   help="0 = greedy; default 0 for --prompt, else 0.7 as in the paper")
    g.add_argument("--top-p", type=TOP_P, default=None,
                   help="nucleus sampling mass; default 1.0 for --prompt, else 0.9 as in the paper")
    g.add_argument("--stop", action="append", default=None, help="extra stop string (repeatable); cut from the output")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="sampling seed, and the --n sample's seed (default 0)")
    g.add_argument("--batch-size", type=POSITIVE, default=16, help="prompts generated together (default 16)")
    add_compile_flag(g)
    g = p.add_argument_group("self-augmentation and predictions")
    g.add_argument("--out", default=None,
                   help="output file: JSONL of generated pairs (appended to, resumable) or, with --predict, CSV")
    g.add_argument("--n", "--n-texts", type=POSITIVE, default=None, dest="n",
                   help="use a seeded random sample of N texts (default: all); spell it --n-texts under torchrun, "
                        "whose own parser takes --n for an abbreviation of its flags")
    g.add_argument("--shard", default=None,
                   help="i/n: process only every n-th text from position i (run n shards with separate --out files)")
    g.add_argument("--tag", choices=["auto", "seed", "augmented", "none"], default="auto",
                   help="--predict only: the tag line before each instruction; auto = 'seed' (assistant style, as the "
                        "paper does at inference) if the adapter was trained with a tag, else none")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def add_prompt_format_flag(group: argparse._ArgumentGroup) -> None:
    """--prompt-format: the rater's prompt in our plain format or in the model's chat template."""
    group.add_argument("--prompt-format", choices=["auto", "chat", "plain"], default="auto",
                       help="layout of the rating prompt: auto = the model's own chat template (ChatML, Llama-2 "
                            "[INST]) when it has one and no --adapter is on it, else our plain '### Instruction' "
                            "format (what our adapters were trained on); chat / plain force one (default auto)")


def curate_parser(description: str | None = None, raise_errors: bool = False) -> argparse.ArgumentParser:
    """curate.py: self-curation (rate, select, report)."""
    p = _parser("curate.py", description, raise_errors)
    g = p.add_argument_group("data")
    g.add_argument("--pairs", required=True,
                   help="pairs to rate: generate.py's self-augmentation output (or any spec data.readers reads)")
    g.add_argument("--out", required=True, help="rated rows, JSONL (appended to; ids already there are skipped)")
    g.add_argument("--curated", required=True, help="the selected pairs, JSONL (rewritten atomically at the end)")
    g.add_argument("--threshold", type=int, choices=[1, 2, 3, 4, 5], default=5,
                   help="keep pairs scored >= this (default 5: the paper's A5; 4 gives A4)")
    g.add_argument("--shard", default=None, help="i/n: rate only every n-th pair from position i "
                   "(run n shards with separate --out/--curated files)")
    add_model_flags(p)
    g = p.add_argument_group("rating")
    g.add_argument("--method", choices=["prompt", "likelihood"], default="prompt",
                   help="prompt: the paper's Table 1 rating prompt, 'Score: N' (default); likelihood: no prompt, "
                        "score 1-5 from how much the instruction raises log p(output) per token (for raters too "
                        "small to follow the prompt; see humback/rating.py rate_by_likelihood)")
    g.add_argument("--k-shot", type=int, default=3, choices=range(0, 6),
                   help="few-shot demonstrations before the Table 1 prompt, 0-5 (default 3; the paper uses 0)")
    g.add_argument("--tag", choices=["auto", "seed", "augmented", "none"], default="auto",
                   help="tag line in the rating prompt; auto = 'seed' if the adapter was trained with a tag, else "
                        "none. A rater prompted in its chat template (--prompt-format) gets no tag line")
    add_prompt_format_flag(g)
    g.add_argument("--max-new-tokens", type=POSITIVE, default=96, help="tokens for the reasoning and score (default 96)")
    g.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="rater sampling temperature (default 0: greedy)")
    g.add_argument("--top-p", type=TOP_P, default=1.0, help="rater nucleus mass (default 1.0)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="sampling seed, used when --temperature > 0 (default 0)")
    g.add_argument("--batch-size", type=POSITIVE, default=8, help="pairs rated together (default 8)")
    add_compile_flag(g)
    g.add_argument("--no-fallback", action="store_true",
                   help="do not score unreadable answers from log-probabilities (they stay unscored)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="push the curated JSONL + a dataset card as a hub dataset repo (token from HF_TOKEN or "
                        "the login cache); the upload folder is written next to --curated first")
    p.checks.append(_likelihood_has_no_prompt)
    return p


def _likelihood_has_no_prompt(args: argparse.Namespace) -> str | None:
    if args.method == "likelihood" and args.prompt_format == "chat":
        return ("--prompt-format chat lays out the rating prompt, and --method likelihood has none (it reads "
                "log p(output) after the plain forward prompt): drop one of them")
    return None


def evaluate_parser(description: str | None = None, raise_errors: bool = False) -> argparse.ArgumentParser:
    """evaluate.py: every model on held-out pairs, against the base."""
    p = _parser("evaluate.py", description, raise_errors)
    g = p.add_argument_group("what to evaluate (one or more)")
    g.add_argument("--backward", metavar="ADAPTER", default=None,
                   help="backward adapter (train.py --direction backward)")
    g.add_argument("--rater", metavar="ADAPTER", default=None,
                   help="rater adapter (the seed model M0, a forward adapter), or 'base' for the base model alone")
    g.add_argument("--forward", metavar="ADAPTER", action="append", default=None,
                   help="forward adapter (M0, M1, ...); repeat to put several in one table")
    g = add_model_flags(p, adapter=False)  # --model: the base the adapters were trained on
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
    g.add_argument("--n", type=POSITIVE, default=50, help="seeded sample of this many pairs (default 50)")
    g.add_argument("--exclude", action="append", default=[],
                   help="drop held-out pairs that appear in this data too (repeatable; any data.readers spec)")
    g.add_argument("--max-output-chars", type=POSITIVE, default=2000,
                   help="cut each held-out answer to this many characters, so prompts fit the context (default 2000)")
    g = p.add_argument_group("prompting and decoding (greedy by default, so runs repeat exactly)")
    g.add_argument("--tag", choices=["auto", "seed", "augmented", "none"], default="auto",
                   help="tag line of rater/forward prompts; auto = 'seed' if the adapter was trained with a tag "
                        "(the base model is prompted with the same tag as the adapter it is compared with). A "
                        "rater prompted in its chat template (--prompt-format) gets no tag line")
    g.add_argument("--k-shot", type=int, default=3, choices=range(0, 6), help="few-shot examples in the rating prompt")
    add_prompt_format_flag(g)
    g.add_argument("--instruction-tokens", type=POSITIVE, default=64, help="max new tokens per instruction (--backward)")
    g.add_argument("--rating-tokens", type=POSITIVE, default=96, help="max new tokens per rating (--rater)")
    g.add_argument("--answer-tokens", type=POSITIVE, default=256, help="max new tokens per answer (--forward)")
    g.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus mass when sampling (default 1.0)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed for the sample, the mismatching and sampling (default 0)")
    g.add_argument("--batch-size", type=POSITIVE, default=8, help="prompts per forward pass (default 8)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="folder for eval.json, eval.md, per-model rows and plots")
    g.add_argument("--no-plots", action="store_true", help="no PNG plots even if matplotlib is installed")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def pipeline_parser(description: str | None = None, raise_errors: bool = False) -> argparse.ArgumentParser:
    """pipeline.py: the whole method as cached stages."""
    p = _parser("pipeline.py", description, raise_errors)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="recipe to run (default demo)")
    p.add_argument("--workdir", required=True, help="run folder; each stage writes WORKDIR/<stage>/")
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                   help="redo this stage and every later one (earlier finished stages are kept)")
    p.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    g = p.add_argument_group("overrides (each replaces the preset's value)")
    g.add_argument("--model", help=f"base model: folder, hub id or {DEFAULT_MODEL}")
    g.add_argument("--quantize", choices=["nf4", "none"], help="4-bit NF4 base or none")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    g.add_argument("--seed-data", help="seed pairs: any data.readers spec (guanaco:..., oasst1:..., a JSONL)")
    g.add_argument("--unlabelled", nargs="+", metavar="SPEC",
                   help="texts to backtranslate: one or more specs (lima:..., web:..., a JSONL); several are "
                        "pooled, e.g. curated answers + raw web pages, to see which ones curation keeps")
    g.add_argument("--test-prompts", help="held-out prompts for 'respond' (lima-prompts:..., a JSONL)")
    g.add_argument("--n-seed", type=POSITIVE, help="sample this many seed pairs")
    g.add_argument("--n-unlabelled", type=POSITIVE, help="sample this many unlabelled texts from each source")
    g.add_argument("--threshold", type=int, choices=range(1, 6), help="keep pairs rated >= this (paper: 5)")
    g.add_argument("--k-shot", type=int, choices=range(0, 6),
                   help="few-shot examples in the rating prompt, curate and evaluate alike (default: the preset's; "
                        "demo 2, assignment and paper 3)")
    g.add_argument("--rater-model", metavar="MODEL",
                   help="self-curation rater: this model alone (folder or hub id, quantized like --model) instead "
                        "of the seed model M0, e.g. a bigger chat model when the base is too small to follow the "
                        "Table 1 prompt, prompted in its own chat template; the evaluate stage then measures this "
                        "rater (the demo preset then gives it 128 new tokens to rate, not 48, to finish its "
                        "reasoning; --curate-args/--eval-args still override). 'm0' rates with the seed model M0, "
                        "the paper's method (the default of the demo and paper presets; the assignment preset "
                        "rates with meta-llama/Llama-2-7b-chat-hf)")
    g.add_argument("--iterations", type=int, choices=[1, 2], help="1: M1; 2: also M2 (paper)")
    g.add_argument("--forward-data", choices=["seed+curated", "curated"], help="what the forward model trains on")
    g.add_argument("--train-args", default="", help="extra train.py flags for every training, e.g. \"--max-steps 5\"")
    g.add_argument("--augment-args", default="", help="extra generate.py flags for self-augmentation")
    g.add_argument("--curate-args", default="", help="extra curate.py flags for self-curation")
    g.add_argument("--heldout", help="held-out pairs for the evaluate stage: any data.readers spec, or 'none' "
                                     "to skip the stage")
    g.add_argument("--eval-args", default="", help="extra evaluate.py flags, e.g. \"--n 30 --no-judge\"")
    g.add_argument("--ablation", action="store_true",
                   help="also run the quality-vs-quantity ablation (ablate-* stages and 'ablation')")
    g.add_argument("--ablation-train-args", default="",
                   help="extra train.py flags for the ablate-* trainings only, after --train-args (e.g. "
                        "\"--epochs 3\": their sets are small)")
    g.add_argument("--ablation-draws", type=POSITIVE, default=1, metavar="K",
                   help="train (b), the random same-size set, on K different random draws (sample and training "
                        "seed SEED, SEED+1, ...), because one draw can be lucky: ablation.md then says how many "
                        "of the K draws (a) beats. If curation made no difference, (a) would still beat all K by "
                        "luck about 1 time in K+1 (default 1; each draw costs one training and one evaluation)")
    g.add_argument("--ablation-match", choices=["pairs", "tokens"], default="pairs",
                   help="what (b) matches in (a): 'pairs', the same number of pairs (the paper's comparison, "
                        "default), or 'tokens', as many answer tokens to train on (after --max-len truncation; "
                        "separates 'which pairs' from 'how much text' when the rater prefers short or long answers)")
    g.add_argument("--ablation-oracle", metavar="SOURCE", default=None,
                   help="add a control (e) to the ablation: trained like (b) on a random same-size sample, but of "
                        "the texts from SOURCE only (a source of a pooled --unlabelled, e.g. 'lima' in a LIMA + web "
                        "pool): what a rater that knew which texts are good would keep. If (e) is not shown better "
                        "than (b) either, the comparison of (a) with (b) says little about the rater")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed for sampling data and decoding (default 0)")
    g.add_argument("--push-to-hub", metavar="OWNER/PREFIX", default=None,
                   help="push the forward adapter(s) as OWNER/PREFIX-m1 (-m2) and the curated data as "
                        "OWNER/PREFIX-curated (upload folders are written under WORKDIR/hub first)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def check_pipeline_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, pre: Preset) -> None:
    """The pipeline's flag combinations that cannot work, refused by argparse (exit code 2) before
    any file is written; ``pre`` is the resolved preset (:func:`humback.presets.resolve_preset`)."""
    if (args.ablation_draws > 1 or args.ablation_match != "pairs") and not args.ablation:
        parser.error("--ablation-draws and --ablation-match shape the ablation: add --ablation")
    if args.ablation_oracle and not args.ablation:
        parser.error("--ablation-oracle adds a control to the ablation: add --ablation")
    if pre.rater_model and pre.iterations == 2:  # iteration 2 exists to rate with M1; a fixed rater repeats iteration 1
        # name the flag the user did not write: it is the one that came from the preset
        if args.rater_model:
            parser.error(f"--rater-model replaces the rater of every iteration, so iteration 2 would repeat "
                         f"iteration 1 (the {args.preset} preset has 2): add --iterations 1")
        parser.error(f"--iterations 2 rates with M0, then M1, but the {args.preset} preset rates with "
                     f"{pre.rater_model} alone, so iteration 2 would repeat iteration 1: add --rater-model m0 "
                     f"(the paper's self-rating) or drop --iterations 2")
    check_passed_flags(parser, args, pre)


# What a stage passes besides a --*-args string: the flags each command requires, with stand-in
# values, so that the string can be parsed by the command's own parser long before the stage runs.
_REQUIRED = {"train": ["--data", "-"], "generate": ["--unlabelled", "-", "--out", "-"],
             "curate": ["--pairs", "-", "--out", "-", "--curated", "-"], "evaluate": ["--out", "-"]}


def check_passed_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, pre: Preset) -> None:
    """Parse the flags the pipeline will pass on (the preset's, with --train-args, --augment-args,
    --curate-args, --eval-args and --ablation-train-args added) with each command's own parser, so
    that a value the command would refuse stops the pipeline now, in one line, not hours later when
    its stage starts."""
    builders = {"train": train_parser, "generate": generate_parser, "curate": curate_parser,
                "evaluate": evaluate_parser}
    passed = [("--train-args", "train", pre.train), ("--augment-args", "generate", pre.augment),
              ("--curate-args", "curate", pre.curate), ("--eval-args", "evaluate", pre.evaluate),
              ("--ablation-train-args", "train", pre.train + shlex.split(args.ablation_train_args))]
    for flag, command, argv in passed:
        if "-h" in argv or "--help" in argv:
            parser.error(f"{flag}: --help is not a flag to pass on to {command}.py (run {command}.py --help)")
        try:
            builders[command](raise_errors=True).parse_args(_REQUIRED[command] + argv)
        except FlagError as e:
            parser.error(f"{flag}: {e}")

