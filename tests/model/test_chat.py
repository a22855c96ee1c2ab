"""Chat formats (model/chat.py) against transformers' own Jinja rendering of the real templates.

The templates are the ones the models ship (tests/model/data/chat_templates.json; checked
against the installed GGUFs when those are present). transformers renders them with
``apply_chat_template``; our hand-written formats must give the same characters, and, for
Llama-2 chat, the same token ids with exactly one BOS.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import load_model
from model.chat import ChatFormat, chat_format
from tests.tiny import SHARED, hf_llama_tokenizer, make_tiny

LLAMA2_MODEL = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"

TEMPLATES = json.loads((Path(__file__).parent / "data" / "chat_templates.json").read_text())
CASES = [  # (user, system): no system message, one, an empty one, and text the template strips
    ("What is the capital of Germany?", None),
    ("Rate the pair below.\n\nInstruction: say hi\nResponse: hi", "You are a careful rater."),
    ("Hi", ""),
    ("  Score it from 1 to 5.\n", None),
]


def messages(user: str, system: str | None) -> list[dict]:
    return ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": user}]


@pytest.fixture(scope="module")
def hf_chat_tokenizer():
    """Any transformers tokenizer can render a template; give it Llama-2's BOS/EOS spelling."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    backend = Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def reference(tok, template: str, user: str, system: str | None) -> str:
    return tok.apply_chat_template(messages(user, system), chat_template=template,
                                   add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("model", ["smollm2", "qwen2.5"])
def test_chatml_matches_transformers(model, hf_chat_tokenizer) -> None:
    fmt = chat_format(TEMPLATES[model])
    assert fmt.name == "chatml" and not fmt.starts_with_bos
    for user, system in CASES:
        assert fmt.render(user, system) == reference(hf_chat_tokenizer, TEMPLATES[model], user, system)


HISTORY = [("Rate: say hi / hi", "Direct and brief.\nScore: 5"), ("Rate: say hi / buy now!", "An advert.\nScore: 1")]


@pytest.mark.parametrize("model", ["smollm2", "qwen2.5"])
def test_chatml_history_matches_transformers(model, hf_chat_tokenizer) -> None:
    """Earlier exchanges (few-shot demonstrations shown as turns the model answered) come out as
    the template writes a conversation: user, assistant, ..., then the new user turn."""
    fmt = chat_format(TEMPLATES[model])
    assert fmt.writes_history
    for user, system in CASES:
        conversation = messages("", system)[:-1] + [
            {"role": role, "content": text} for u, a in HISTORY for role, text in (("user", u), ("assistant", a))]
        want = hf_chat_tokenizer.apply_chat_template(conversation + [{"role": "user", "content": user}],
                                                     chat_template=TEMPLATES[model], add_generation_prompt=True,
                                                     tokenize=False)
        assert fmt.render(user, system, HISTORY) == want
    assert fmt.render("Hi", history=()) == fmt.render("Hi")


def test_llama2_takes_one_user_turn() -> None:
    fmt = chat_format(TEMPLATES["llama2-chat"])
    assert not fmt.writes_history
    with pytest.raises(ValueError, match="llama2 chat format takes one user turn"):
        fmt.render("Hi", history=HISTORY)


def test_chatml_default_system_prompts() -> None:
    assert chat_format(TEMPLATES["qwen2.5"]).default_system == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert chat_format(TEMPLATES["smollm2"]).default_system == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    plain = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert chat_format(plain) == ChatFormat("chatml", None)
    assert chat_format(plain).render("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_llama2_matches_transformers(hf_chat_tokenizer) -> None:
    template = TEMPLATES["llama2-chat"]
    fmt = chat_format(template)
    assert fmt.name == "llama2" and fmt.starts_with_bos
    for user, system in CASES:
        # The template writes BOS as the text "<s>"; render leaves it to the tokenizer.
        assert "<s>" + fmt.render(user, system) == reference(hf_chat_tokenizer, template, user, system)
    assert fmt.render("Hi", "Be brief.") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"


def test_unknown_or_missing_templates_have_no_format() -> None:
    assert chat_format(None) is None and chat_format("") is None
    llama3 = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% endfor %}"
    assert chat_format(llama3) is None
    mistral = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert chat_format(mistral) is None  # [INST] without <<SYS>>: a different layout


def test_templates_are_the_shipped_ones() -> None:
    """The test data equals the templates inside the installed GGUFs (skips what is absent)."""
    gguf = pytest.importorskip("gguf")
    from model.packaged import QWEN25_CODER_1_5B, SMOLLM2, PackageError, part_paths
    checked = 0
    try:
        (path,) = part_paths(SMOLLM2)
        assert gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents() == TEMPLATES["smollm2"]
        checked += 1
    except PackageError:
        pass
    try:
        first = part_paths(QWEN25_CODER_1_5B)[0]  # the metadata (and template) sit in part 1
        blob = first.read_bytes()
        assert TEMPLATES["qwen2.5"].encode() in blob
        checked += 1
    except PackageError:
        pass
    if not checked:
        pytest.skip("neither packaged model is installed")


@pytest.fixture(scope="module")
def tiny_llama2_chat(tmp_path_factory) -> Path:
    """A tiny random Llama with Llama-2's real tokenizer and Llama-2-chat's tokenizer_config.json
    (template, BOS, add_bos), standing in for the 7B chat model that cannot be downloaded here."""
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"{LLAMA2_MODEL} is absent")
    folder = make_tiny(tmp_path_factory.mktemp("tiny_chat"), vocab_size=32000, tokenizer_model=LLAMA2_MODEL)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": TEMPLATES["llama2-chat"]}))
    return folder


def test_llama2_chat_ids_have_one_bos(tiny_llama2_chat: Path) -> None:
    """Encoded the project's way (``encode(text, bos=add_bos)``) the prompt starts with one BOS id,
    and its ids are the ones transformers' tokenized template gives with Llama-2's vocabulary."""
    pytest.importorskip("jinja2")
    from model import generate

    model, tok = load_model(tiny_llama2_chat, device="cpu")
    fmt = tok.chat_format
    assert fmt is not None and fmt.name == "llama2" and tok.add_bos
    ref = hf_llama_tokenizer(LLAMA2_MODEL)
    for user, system in CASES:
        ids = tok.encode(fmt.render(user, system), bos=tok.add_bos)
        assert ids[0] == tok.bos_id == 1 and ids.count(1) == 1
        expected = ref.apply_chat_template(messages(user, system), chat_template=TEMPLATES["llama2-chat"],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == list(expected), (user, system)
    assert tok.encode(fmt.render("Hi"), bos=True)[:5] == [1, 518, 25580, 29962, 6324]  # <s> ▁[ INST ] ▁Hi
    # ... and the prompt runs through the model and the sampler.
    assert len(generate(model, tok, [fmt.render("Once upon a time")], max_new_tokens=4)) == 1
