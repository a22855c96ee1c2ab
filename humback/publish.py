"""Publishing to the Hugging Face hub: an upload folder with a card, then one ``upload_folder``.

Two kinds of things are pushed:

* a **LoRA adapter** (a model repo): ``adapter_config.json`` + ``adapter_model.safetensors`` in
  PEFT's format, and a model card saying what it was trained from and how to load it;
* a **curated dataset** (a dataset repo): the JSONL and a dataset card.

The folder that would be uploaded is always written first, next to the run, complete. Only then
is the hub contacted, so when it cannot be reached (no network, no token) nothing is lost: the
error is one line naming the folder, which can be uploaded later with ``huggingface-cli upload``.
The token comes from ``HF_TOKEN`` or the ``huggingface-cli login`` cache (huggingface_hub reads
both); it is never printed or written.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from humback.presets import Preset


class PushError(RuntimeError):
    """The hub push failed; the upload folder is kept (its path is in the message)."""


def push_folder(folder: str | os.PathLike, repo_id: str, repo_type: str = "model", private: bool = False) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; return the repo URL."""
    try:
        from huggingface_hub import HfApi
        api = HfApi()  # token: HF_TOKEN or the login cache, resolved by huggingface_hub itself
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                          commit_message="Upload from humback-torch")
        return str(url)
    except Exception as e:  # offline, auth, HTTP: one line, and the folder stays
        first = " ".join(str(e).split())[:200]
        raise PushError(f"push of {folder} to the hub repo '{repo_id}' failed ({type(e).__name__}: {first}); "
                        f"the upload folder is complete at {folder}") from None


def _front_matter(meta: Mapping[str, Any]) -> str:
    lines = ["---"]
    for k, v in meta.items():
        if isinstance(v, (list, tuple)):
            lines.append(f"{k}:")
            lines += [f"- {x}" for x in v]
        elif v is not None:
            lines.append(f"{k}: {v}")
    return "\n".join(lines + ["---", ""])


def adapter_card(repo_id: str, adapter_config: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """Model card for a LoRA adapter: what, from what, trained how, loaded how."""
    base = adapter_config.get("base_model_name_or_path") or info.get("base_model", "?")
    targets = ", ".join(adapter_config.get("target_modules") or [])
    rows = [("base model", f"`{base}`"),
            ("LoRA", f"r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
                     f"dropout={adapter_config.get('lora_dropout')}, targets: {targets}"),
            ("direction", info.get("direction", "forward")), ("tag", info.get("tag", "none")),
            ("training data", info.get("data", "?")), ("examples", info.get("examples", "?")),
            ("steps", info.get("steps", "?")), ("precision", info.get("precision", "?")),
            ("final train loss", info.get("final_loss", "?")), ("eval loss", info.get("eval_loss", "?"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    role = ("backward model p(instruction | output) for self-augmentation"
            if info.get("direction") == "backward" else "forward (instruction-following) model")
    return _front_matter({"base_model": base, "library_name": "peft", "license": info.get("license"),
                          "tags": ["lora", "humback", "instruction-backtranslation"]}) + f"""
# {repo_id}

A LoRA adapter trained with humback-torch (a pure-PyTorch implementation of
*Self-Alignment with Instruction Backtranslation*, Li et al. 2023, arXiv:2308.06259): the {role}.

| | |
|---|---|
{table}

## Load it with humback-torch

```python
from model import load_model, generate
from lora.adapter import load_adapter
model, tok = load_model("{base}")          # add quantize="nf4" for a 4-bit base
load_adapter(model, "path/to/this/adapter")
```

## Load it with PEFT

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo_id}")
```
"""


def dataset_card(repo_id: str, info: Mapping[str, Any]) -> str:
    """Dataset card for a curated (self-augmented, self-rated) instruction set."""
    hist = info.get("histogram") or {}
    hist_rows = "\n".join(f"| {s} | {n} |" for s, n in sorted(hist.items(), key=lambda kv: int(kv[0])))
    return _front_matter({"license": info.get("license"), "task_categories": ["text-generation"],
                          "tags": ["humback", "instruction-backtranslation", "synthetic"]}) + f"""
# {repo_id}

Instruction-following pairs made by instruction backtranslation (Li et al. 2023, arXiv:2308.06259)
with humback-torch: a backward model wrote an instruction for each unlabelled text
(self-augmentation), a rater model scored each pair 1-5 with the paper's Table 1 prompt
(self-curation), and the pairs scoring >= {info.get('threshold', 5)} were kept.

| | |
|---|---|
| unlabelled source | {info.get('unlabelled', '?')} |
| backward model | {info.get('backward_model', '?')} |
| rater | {info.get('rater', '?')} |
| pairs rated | {info.get('rated', '?')} |
| pairs kept | {info.get('kept', '?')} |

Score histogram:

| score | pairs |
|---|---|
{hist_rows}

Fields: `id`, `instruction`, `output`, `source` (and `score`, `score_method` where rated).
"""


def publish_adapter(adapter_dir: str | os.PathLike, repo_id: str, info: Mapping[str, Any],
                    upload_root: str | os.PathLike, push: bool = True) -> Path:
    """Write ``upload_root/`` = the adapter + README.md card, then push it (unless ``push=False``)."""
    src, dst = Path(adapter_dir), Path(upload_root)
    cfg = json.loads((src / "adapter_config.json").read_text())
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(src / name, tmp / name)
    (tmp / "README.md").write_text(adapter_card(repo_id, cfg, info))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    if push:
        push_folder(dst, repo_id, "model")
    return dst


def publish_dataset(jsonl: str | os.PathLike, repo_id: str, info: Mapping[str, Any],
                    upload_root: str | os.PathLike, push: bool = True) -> Path:
    """Write ``upload_root/`` = data/train.jsonl + README.md card, then push it as a dataset repo."""
    dst = Path(upload_root)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    shutil.copy2(jsonl, tmp / "data" / "train.jsonl")
    (tmp / "README.md").write_text(dataset_card(repo_id, info))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    if push:
        push_folder(dst, repo_id, "dataset")
    return dst


def publish_run(prefix: str, pre: Preset, work: Path, adapters: list[Path], curated_dirs: list[Path]) -> None:
    """``pipeline.py --push-to-hub OWNER/PREFIX``: the forward adapters as PREFIX-m1 (-m2) and the
    last curated set as PREFIX-curated; every upload folder is written first, then pushed. One
    PushError naming every push that failed."""
    from humback.curation import histogram, read_rated  # here, not at the top: humback.curation imports this module
    errors = []
    for i, adapter in enumerate(adapters, start=1):
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        info = dict(base_model=pre.model, direction="forward", tag=cfg.get("tag", "seed"),
                    data=f"{pre.seed_data} + curated {' + '.join(pre.unlabelled)}", precision=pre.quantize or "bf16")
        try:
            publish_adapter(adapter, f"{prefix}-m{i}", info, work / "hub" / f"m{i}")
        except PushError as e:
            errors.append(str(e))
    cdir = curated_dirs[-1]
    rows = read_rated(cdir / "rated.jsonl")
    info = dict(unlabelled=" + ".join(pre.unlabelled), backward_model=f"{pre.model} + backward LoRA",
                rater=pre.rater_model or ("seed model M0" if len(curated_dirs) == 1 else "M1 (iteration 2)"),
                threshold=pre.threshold, rated=len(rows), histogram=histogram(rows),
                kept=sum(1 for _ in open(cdir / "curated.jsonl")))
    try:
        publish_dataset(cdir / "curated.jsonl", f"{prefix}-curated", info, work / "hub" / "curated")
    except PushError as e:
        errors.append(str(e))
    if errors:
        raise PushError("; ".join(errors))
