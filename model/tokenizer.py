"""Tokenizers: text <-> token ids, behind one small interface.

A language model never sees characters, only integer ids. The tokenizer is the fixed,
*separately trained* mapping between the two, and it must be exactly the one the model was
trained with: a single different split ("Hello" vs "Hel"+"lo") feeds the model ids it has
rarely or never seen in that position, and quality quietly drops.

Two families matter for this project, and both are "byte-pair encoding" (BPE) underneath:

* **SentencePiece** (``tokenizer.model``; Llama-2, llama2.c's stories260K). Spaces are
  turned into the visible character ``▁`` and a ``▁`` is prepended to the text, so
  "Hello world" becomes the pieces ``▁Hello ▁world`` → ids [15043, 3186] for Llama-2.
  Characters missing from the vocabulary fall back to their UTF-8 bytes (``<0xE4>`` ...).
  We call Google's ``sentencepiece`` library, the very code Meta used.
* **Byte-level BPE** (``tokenizer.json``; GPT-2, SmolLM2, Llama-3). The text is first
  split into word-like chunks by a regular expression (the "pre-tokenizer"), every byte
  is mapped to a printable stand-in character (a space becomes ``Ġ``), and learned merges
  glue bytes into tokens. We call Hugging Face's ``tokenizers`` library, which reads the
  ``tokenizer.json`` the model was published with (see :class:`BPETokenizer` for why).

Both are wrapped in :class:`Tokenizer`, which also records the facts a training or
generation loop needs: which id is BOS/EOS/padding, whether the model expects a BOS in
front of every sequence, and which ids should stop generation.

``encode`` never adds special tokens by itself: callers say ``bos=True``/``eos=True``.
This keeps sequence building explicit (e.g. the SFT loss masks the prompt and appends EOS
to the target; generation prepends BOS only if ``add_bos``).

One deliberate asymmetry: a :class:`BPETokenizer` recognises special-token *text* such as
``<|im_start|>`` inside the string you encode (that is how a chat prompt rendered by
``chat_format`` becomes the right control ids), while :class:`SentencePieceTokenizer` treats
``<s>``/``</s>`` written in text as ordinary characters, exactly like Meta's Llama code.
Use ``bos=``/``eos=`` to add those.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .chat import ChatFormat, chat_format

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "BPETokenizer",
    "TokenizerError",
    "load_tokenizer",
]

# Tokens that end an assistant turn or a document in common chat/base vocabularies. When a
# vocabulary contains one of them as a special token, generation stops on it too: a chat
# model ends its reply with <|im_end|> (ChatML) even though its "eos" may be another token.
_KNOWN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")

class TokenizerError(ValueError):
    """A request the tokenizer cannot satisfy (e.g. ``bos=True`` without a BOS token).

    Missing files raise :class:`FileNotFoundError` instead, naming the path.
    """


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """``tokenizer_config.json`` writes a special token as ``"<s>"`` or ``{"content": "<s>", ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any) -> int | None:
    """``config.json`` may give ``eos_token_id`` as an int or a list of ints."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return int(value) if isinstance(value, int) else None


class Tokenizer:
    """The interface the rest of the project uses. Subclasses fill in the attributes.

    Attributes:
        vocab_size: number of ids (the size of the model's embedding table it matches).
        bos_id: "beginning of sequence" id, or None if the vocabulary has none.
        eos_id: "end of sequence" id: appended to training targets so the model learns to stop.
        pad_id: a valid id used to pad batches (masked out of the loss and attention anyway).
        add_bos: whether the model was trained with BOS in front of every sequence.
        stop_ids: ids that end generation (EOS, and for chat models the end-of-turn token).
        chat_template: the model's Jinja chat template, if it ships one (``chat_format`` reads it).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    add_bos: bool
    stop_ids: list[int]
    chat_template: str | None = None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS/EOS only when asked for."""
        ids = self._encode(text)
        if bos:
            if self.bos_id is None:
                raise TokenizerError("this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise TokenizerError("this tokenizer has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, ``<|im_end|>``...) dropped unless asked."""
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    @property
    def chat_format(self) -> ChatFormat | None:
        """The model's chat layout (ChatML, Llama-2 chat), recognised from ``chat_template``, or
        None: ``tokenizer.chat_format.render(user, system)`` is the prompt (see model/chat.py)."""
        return chat_format(self.chat_template)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry (piece) for one id, e.g. ``▁Hello`` or ``<|im_end|>``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos}, "
                f"stop_ids={self.stop_ids})")


class SentencePieceTokenizer(Tokenizer):
    """A ``tokenizer.model`` (SentencePiece protobuf) through Google's ``sentencepiece``.

    BOS/EOS/PAD ids come from the model file itself (Llama-2: ``<s>``=1, ``</s>``=2, no pad,
    so padding uses EOS); a ``tokenizer_config.json`` (``add_bos_token``, ``chat_template``)
    or ``config.json`` (``bos_token_id``/``eos_token_id``) in the same folder overrides them.
    SentencePiece models (Llama-1/2, llama2.c) are trained with BOS on every sequence, so
    ``add_bos`` defaults to True.
    """

    def __init__(self, path: str | Path, add_bos: bool | None = None) -> None:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        # sentencepiece reports -1 for "this model has no such token".
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

        config = _read_json(path.parent / "config.json")
        tok_config = _read_json(path.parent / "tokenizer_config.json")
        if config.get("bos_token_id") is not None:
            self.bos_id = _first_id(config["bos_token_id"])
        if config.get("eos_token_id") is not None:
            self.eos_id = _first_id(config["eos_token_id"])
        if config.get("pad_token_id") is not None:
            pad = _first_id(config["pad_token_id"])
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        if add_bos is None:
            add_bos = bool(tok_config.get("add_bos_token", True))
        self.add_bos = add_bos
        self.chat_template = tok_config.get("chat_template")
        self.stop_ids = [self.eos_id] if self.eos_id is not None else []

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            # sentencepiece already renders control tokens (<s>, </s>) as "".
            return self.sp.decode(ids)
        # Keep control tokens visible: decode the ordinary stretches, spell the rest.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if self.sp.is_control(i):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (byte-level BPE such as SmolLM2's) via ``tokenizers``.

    Why a library instead of fifty lines of Python BPE? The merge loop itself is simple, but
    the *pre-tokenizer* is not: SmolLM2 first isolates every digit, then splits with GPT-2's
    Unicode regex (``'s|'t|...| ?\\p{L}+| ?\\p{N}+|...``), which Python's ``re`` cannot even
    express (no ``\\p{L}``), and special tokens such as ``<|im_start|>`` must be matched
    before any of that. A near-copy that differs on one rare string gives the model ids it
    never saw in training. ``tokenizers`` is the Rust library that *defines* this format,
    so it is exact by construction, fast, and a small, well-maintained wheel.

    Any ``tokenizer.json`` works (Llama-2's and Llama-3's too), since the file describes its
    own pipeline. Special tokens come from ``tokenizer_config.json`` next to the file
    (``bos_token``, ``eos_token``, ``pad_token``, ``add_bos_token``, ``chat_template``),
    falling back to the ids in ``config.json``; without an ``add_bos_token`` flag, ``add_bos``
    is whether the file's post-processor would prepend BOS. SmolLM2-Instruct: BOS ``<|im_start|>``=1, EOS ``<|im_end|>``=2,
    no BOS prepended; generation also stops on ``<|endoftext|>``=0.
    """

    def __init__(self, tokenizer_json: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {tokenizer_json}")
        self.path = tokenizer_json
        self.tok = HFTokenizer.from_file(str(tokenizer_json))
        folder = tokenizer_json.parent
        tok_config = _read_json(folder / "tokenizer_config.json")
        config = _read_json(folder / "config.json")

        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

        def lookup(name: str) -> int | None:
            text = _token_text(tok_config.get(f"{name}_token"))
            if text is not None and self.tok.token_to_id(text) is not None:
                return self.tok.token_to_id(text)
            return _first_id(config.get(f"{name}_token_id"))

        self.bos_id = lookup("bos")
        self.eos_id = lookup("eos")
        pad = lookup("pad")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        if "add_bos_token" in tok_config:
            self.add_bos = bool(tok_config["add_bos_token"]) and self.bos_id is not None
        else:
            # No explicit flag (e.g. Llama-3): the model wants BOS if the tokenizer.json's
            # post-processor would add it. GPT-2 and SmolLM2 add nothing.
            with_specials = self.tok.encode("", add_special_tokens=True).ids
            self.add_bos = self.bos_id is not None and with_specials[:1] == [self.bos_id]
        self.chat_template = tok_config.get("chat_template")

        stops: list[int] = [] if self.eos_id is None else [self.eos_id]
        eos_cfg = config.get("eos_token_id")
        for i in eos_cfg if isinstance(eos_cfg, list) else []:
            stops.append(int(i))
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        for text in _KNOWN_STOP_TOKENS:
            if text in special:
                stops.append(self.tok.token_to_id(text))
        self.stop_ids = list(dict.fromkeys(stops))  # de-duplicate, keep order (eos first)

    def _encode(self, text: str) -> list[int]:
        # add_special_tokens=False: never let a post-processor slip in BOS/EOS behind our back.
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str:
        token = self.tok.id_to_token(int(token_id))
        if token is None:
            raise IndexError(f"token id {token_id} is out of range (vocab_size={self.vocab_size})")
        return token


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer in a model folder: ``tokenizer.json`` first, else ``tokenizer.model``.

    ``tokenizer.json`` wins when both exist because it is the complete, newer description
    (pre-tokenizer, added tokens), and Hugging Face prefers it too. A path to one of the two
    files is accepted as well.
    """
    folder = Path(folder)
    if folder.is_file():
        if folder.name.endswith(".json"):
            return BPETokenizer(folder)
        return SentencePieceTokenizer(folder)
    if (folder / "tokenizer.json").is_file():
        return BPETokenizer(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer(folder / "tokenizer.model")
    what = "does not exist" if not folder.exists() else "contains neither file"
    raise FileNotFoundError(
        f"cannot load a tokenizer from {folder}: expected tokenizer.json (Hugging Face "
        f"byte-level BPE) or tokenizer.model (sentencepiece) there, but the folder {what}"
    )
