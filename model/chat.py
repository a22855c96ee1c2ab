"""Chat formats: wrapping a user message the way a chat model was fine-tuned to read it.

An instruction-tuned model has learned one exact layout of a conversation, down to the newlines.
Given a bare prompt it still continues the text, but it follows instructions far less reliably
(a rater asked for "Score: N" may just keep writing). Hugging Face models ship that layout as a
Jinja ``chat_template`` in ``tokenizer_config.json``. Rather than run a template engine on text
that came with a download, we recognise the two layouts this project meets and write them out by
hand (the tests check every character against transformers' ``apply_chat_template``):

* **ChatML** (Qwen2/2.5, SmolLM2): ``<|im_start|>`` and ``<|im_end|>`` are single special tokens::

      <|im_start|>system
      You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
      <|im_start|>user
      Rate this pair ...<|im_end|>
      <|im_start|>assistant

  Both models' templates insert a default system turn when none is given (Qwen2.5 the line
  above, SmolLM2 "You are a helpful AI assistant named SmolLM, trained by Hugging Face"); we read
  that default out of the template, so the model sees exactly what it saw in training. The reply
  ends with ``<|im_end|>``, which the tokenizer's ``stop_ids`` contain.
* **Llama-2 chat** (meta-llama/Llama-2-7b-chat-hf; Touvron et al. 2023, section 3)::

      <s>[INST] <<SYS>>
      {system}
      <</SYS>>

      {user} [/INST]

  without the ``<<SYS>>`` block when there is no system message. The template strips the
  message, and the reply ends with ``</s>`` (EOS).

``<s>`` is the BOS *token*, not text: Llama-2's sentencepiece tokenizer would spell the string
"<s>" as three ordinary pieces. So :meth:`ChatFormat.render` leaves it out and the prompt is
encoded the way every prompt in this project is, ``tokenizer.encode(text, bos=tokenizer.add_bos)``,
which puts exactly one BOS id in front (``starts_with_bos`` says the template wants one)::

    fmt = tokenizer.chat_format            # None: no chat template, or one we do not recognise
    if fmt is not None:
        prompt = fmt.render("Rate this pair ...")
        generate(model, tokenizer, [prompt])
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ChatFormat", "chat_format"]

CHATML = "chatml"
LLAMA2 = "llama2"

# A ChatML template's built-in system turn: the literal text between "<|im_start|>system" + newline
# and "<|im_end|>" inside one Jinja string, i.e. with no quote, brace or escape in between. The
# newline is written either as a real one (SmolLM2) or as the escape "\n" (Qwen2.5).
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}\\\n]+)<\|im_end\|>")


@dataclass(frozen=True)
class ChatFormat:
    """One recognised chat layout. ``render`` turns a user message (and an optional system
    message) into the prompt text, ending where the model's reply begins."""

    name: str  # "chatml" or "llama2"
    default_system: str | None = None  # the system turn a ChatML template adds when none is given

    @property
    def starts_with_bos(self) -> bool:
        """Whether the template puts the BOS token first (Llama-2). ``render`` leaves it to the
        tokenizer: encode with ``bos=tokenizer.add_bos``, which is True for Llama-2."""
        return self.name == LLAMA2

    @property
    def reply_separator(self) -> str:
        """What the template writes between the prompt and the model's reply: a space for Llama-2
        (its assistant turn is ``' ' + content``), nothing for ChatML (the prompt ends in a newline).

        Text that continues a reply the model already began, such as the rater's forced ``Score:``
        after its own reasoning, must keep it: sentencepiece spells "[/INST] The" as ``]`` ``▁The``,
        the tokens the model generated, but "[/INST]The" as ``]`` ``The``, a sequence it never wrote."""
        return " " if self.name == LLAMA2 else ""

    @property
    def writes_history(self) -> bool:
        """Whether ``render`` can put earlier turns in front (ChatML: its turn markers are special
        tokens spelled as text). Llama-2 chat separates turns with ``</s><s>``, the EOS and BOS
        *tokens*, which a prompt text cannot carry through a sentencepiece tokenizer."""
        return self.name == CHATML

    def render(self, user: str, system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt for one user turn, with the generation prompt (the assistant's header).

        ``history`` holds earlier (user, assistant) exchanges, written before it as the model saw
        conversations in training: a way to show a few-shot demonstration as a turn the model
        itself answered (ChatML only, see ``writes_history``).

        Equals transformers' ``apply_chat_template([{"role": "system", ...}, {"role": "user",
        ...}, ...], add_generation_prompt=True, tokenize=False)``, minus the leading BOS text when
        ``starts_with_bos``."""
        if history and not self.writes_history:
            raise ValueError(f"the {self.name} chat format takes one user turn here: its turns are "
                             f"separated by EOS/BOS tokens, which prompt text cannot carry")
        if self.name == CHATML:
            system = self.default_system if system is None else system
            head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
            past = "".join(f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
                           for u, a in history)
            return f"{head}{past}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        content = user if system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        return f"[INST] {content.strip()} [/INST]"


def chat_format(template: str | None) -> ChatFormat | None:
    """The chat format a ``chat_template`` describes: ChatML, Llama-2 chat, or None (no template,
    or a layout not written out here: such a model is then prompted as plain text)."""
    if not template:
        return None
    if "<|im_start|>" in template:
        found = _DEFAULT_SYSTEM.search(template)
        return ChatFormat(CHATML, found.group(1) if found else None)
    if "[INST]" in template and "<<SYS>>" in template:
        return ChatFormat(LLAMA2)
    return None
