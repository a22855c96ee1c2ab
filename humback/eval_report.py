"""What ``evaluate.py`` writes for people to read: the Markdown tables (eval.md) and the plots.

:func:`markdown_table` lays out rows of numbers (also for the ablation's ``ablation.md``);
:func:`render_markdown` turns the report of :func:`humback.evaluation.run` into eval.md, one table
per model kind with a note on how to read it; :func:`plot` draws the PNGs when matplotlib (an
optional package) is installed.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from humback.curation import render_histogram

# ------------------------------------------------------------------------------- tables

Column = tuple[str, str, str]  # (key in the row, header, format spec such as ".2f")
TEXT_COLUMNS = ("model", "prompt_format", "adapter", "tag", "set")  # left-aligned; the rest are numbers, right-aligned


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub Markdown table: one line per row, missing values as "-"."""
    def cell(value: Any, spec: str) -> str:
        if value is None:
            return "-"
        if isinstance(value, float) and spec:
            return format(value, spec)
        return str(value)
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if k in TEXT_COLUMNS else "---:" for k, _, _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k), spec) for k, _, spec in columns) + " |")
    return "\n".join(lines)


BACKWARD_COLUMNS: list[Column] = [("model", "model", ""), ("n", "pairs", ""), ("bleu", "BLEU", ".2f"),
                                  ("rouge_l", "ROUGE-L", ".3f"), ("empty", "empty", "")]
RATER_COLUMNS: list[Column] = [("model", "model", ""), ("prompt_format", "prompt", ""), ("n_real", "real", ""),
                               ("n_mismatched", "mismatched", ""),
                               ("auc", "AUC (score)", ".3f"), ("auc_expected", "AUC (expected score)", ".3f"),
                               ("auc_likelihood", "AUC (likelihood)", ".3f"),
                               ("valid_score_rate", "valid score rate", ".2f"), ("mean_real", "mean real", ".2f"),
                               ("mean_mismatched", "mean mismatched", ".2f")]
FORWARD_COLUMNS: list[Column] = [("model", "model", ""), ("tag", "tag", ""), ("n", "pairs", ""),
                                 ("nll", "NLL/token", ".3f"), ("perplexity", "perplexity", ".2f"),
                                 ("wins", "wins", ""), ("losses", "losses", ""), ("ties", "ties", ""),
                                 ("win_rate", "win rate", ".2f"), ("win_rate_ties_half", "win+tie/2", ".2f"),
                                 ("first_position_rate", "judge picks first", ".2f"),
                                 ("fallback_rate", "judge fallback", ".2f")]


# ---------------------------------------------------------------------------- eval.md


def render_markdown(report: dict[str, Any]) -> str:
    """eval.md: what was measured, one table per model kind, and how to read it."""
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
                  "humback.rating.instruction_information). *valid score rate*: answers with a readable \"Score: N\"."]
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
