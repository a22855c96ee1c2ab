"""From (prompt, target) text pairs to padded training batches whose loss covers the target only.

As in artidoro/qlora's causal-LM collator, the prompt ("source") and the target are tokenized
*separately* and concatenated:

    input_ids = [BOS] + encode(prompt) + encode(target) + [EOS]
    labels    = [-100] * (1 + len(prompt ids)) + encode(target) + [EOS]

-100 is the ignore index of ``cross_entropy``: the model reads the prompt but is graded only on
the target tokens and the EOS that teaches it to stop (the paper: "loss on output tokens only").
Tokenizing separately makes the source/target boundary exact, and the sampler and the scorer
encode prompts the same way, so training and inference see identical prompt tokens.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.lm_loss import IGNORE_INDEX  # one definition, shared with the fused loss


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def target_tokens(self) -> int:
        """Tokens the loss grades: labels after the first (they predict it), -100 excluded."""
        return sum(lab != IGNORE_INDEX for lab in self.labels[1:])


def tokenize_pair(tokenizer, prompt: str, target: str, max_len: int) -> Example:
    """One training example, truncated to ``max_len`` tokens by this rule:

    1. the target (with its EOS) keeps at least ``max_len // 2`` tokens, or all of it if shorter,
       so it is never cut to nothing; a cut target loses its end (and its EOS);
    2. the prompt gets the remaining budget and, if too long, loses its *beginning* (after BOS):
       the end of a prompt holds the template's response header, which must stay next to the target.
    """
    if not target.strip():
        raise ValueError(f"empty target for prompt {prompt[:60]!r}: nothing to learn")
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    src = tokenizer.encode(prompt)
    tgt = tokenizer.encode(target) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    truncated = False
    if len(bos) + len(src) + len(tgt) > max_len:
        truncated = True
        room = max_len - len(bos)
        keep_tgt = min(len(tgt), max(room // 2, room - len(src)))
        tgt = tgt[:keep_tgt]
        keep_src = room - len(tgt)
        src = src[len(src) - keep_src:] if keep_src > 0 else []
    ids = bos + src + tgt
    labels = [IGNORE_INDEX] * (len(bos) + len(src)) + tgt
    return Example(ids, labels, truncated)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples: padding gets label -100 and attention mask 0."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of indices in which examples of similar length sit together.

    Shuffle, cut into "mega-batches" of 16 batches, sort each by length, split into batches,
    then shuffle the batch order: similar lengths share a batch (little padding) while the data
    order stays random across the epoch (the idea behind HF's group_by_length)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 16
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i:i + mega], key=lambda j: -lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def target_token_count(labels: torch.Tensor) -> int:
    """How many tokens a batch is graded on (labels shifted by one, -100 excluded)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over target tokens only: logits at position t predict token t+1.

    ``reduction="sum"`` lets gradient accumulation divide by the token count of the whole
    accumulated batch, so k micro-batches give exactly the gradient of one big batch."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
