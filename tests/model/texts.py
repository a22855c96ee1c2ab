"""Text for tokenizer tests: tricky built-in strings, plus a few hundred real documents from
../shared/data when it is present (guanaco and C4 documents, LIMA conversations)."""
from __future__ import annotations

import json

from tests.tiny import SHARED

BUILTIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Steps:\n\n1. Preheat the oven to 180 °C.\n2. Mix 250 g flour with 3 eggs.\n\n\n  10. Done!",
    "def f(x):\n    return x ** 2  # square\n\tprint(f(12))",
    "Café, naïve, Ελληνικά, русский, 中文, 日本語, العربية, emoji 🤗👨‍👩‍👧",
    "Prices rose 3.5% in Q3 2023; ０１２ ١٢٣ ²³ ½ Ⅻ",
    "I'm sure you'll see they've done it.  Double  spaces   and trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "Instruction backtranslation: a seed model writes instructions for web documents.\n\n",
    "   Indented line\n\n\n\tTabbed line\r\nWindows line end",
    "Quotes: \"double\", 'single', `code`, <angle>, [square], {curly} -- and... ellipses!",
    "ALL CAPS, camelCase, snake_case, kebab-case, URLs like https://example.org/a?b=c#d",
]


def sample_texts() -> list[str]:
    """A few hundred real documents from ../shared/data when present, else built-in text."""
    data = SHARED / "data"
    texts = list(BUILTIN_TEXT)
    if not data.is_dir():
        return texts
    for name in ("guanaco/openassistant_best_replies_eval.jsonl", "web/c4_demo.jsonl"):
        with open(data / name, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(150), f)]
    with open(data / "lima" / "train.jsonl", encoding="utf-8") as f:
        for _, line in zip(range(75), f):
            texts += json.loads(line)["conversations"]
    return texts
