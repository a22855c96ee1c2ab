"""The model package: a hand-written Llama (and Qwen2), its loader, tokenizers, chat formats and the sampler.

Public API::

    from model import load_model, generate, score
    model, tok = load_model("smollm2-135m-instruct")           # or a folder / hub repo id
    model, tok = load_model("meta-llama/Llama-2-7b-hf", quantize="nf4", device="cuda")
    model, tok = load_model("qwen2.5-coder-1.5b-instruct")     # Qwen2; after `make rater`
    prompt = tok.chat_format.render("Rate this pair ...")      # the model's chat layout (model/chat.py)
    logits = model(input_ids)
    generate(model, tok, ["Once upon a time"], max_new_tokens=32)
    score(model, tok, ["Q: 2+2=\\nA:"], [" 4"])                  # summed log-probabilities
"""
from .config import LlamaConfig
from .llama import Llama


def __getattr__(name):  # lazy: importing the network must not pull in bitsandbytes/huggingface_hub
    if name in ("load_model", "save_model"):
        from . import load
        return getattr(load, name)
    if name in ("generate", "score"):
        from . import sampling
        return getattr(sampling, name)
    raise AttributeError(name)


__all__ = ["LlamaConfig", "Llama", "load_model", "save_model", "generate", "score"]
