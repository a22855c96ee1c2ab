"""LoRA and QLoRA for our hand-written Llama, in plain PyTorch, with PEFT-compatible adapter files.

Public API::

    from lora import inject_lora, lora_parameters, format_trainable, save_adapter, load_adapter
    report = inject_lora(model, targets="all-linear", r=16, alpha=32, dropout=0.05, seed=0)
    print(format_trainable(report))         # trainable params: ... || all params: ... || trainable%: ...
    opt = torch.optim.AdamW(lora_parameters(model), lr=2e-4)
    ...                                     # train: only the A and B matrices get gradients
    save_adapter(model, "out/adapter")      # adapter_config.json + adapter_model.safetensors (PEFT)
    with disable_lora(model): ...           # evaluate the base model
    export_merged(model, "out/merged")      # a plain bf16 checkpoint with the adapter folded in

Files, one job each:
    layer.py    LoRALinear: base(x) + (alpha/r) · B(A(dropout(x))), merge/unmerge
    inject.py   inject_lora, lora_parameters, merge_lora/unmerge_lora/unwrap_lora, disable_lora
    quant.py    4-bit NF4 weights to full precision and back (for merging QLoRA)
    export.py   dequantize_model, merged_state_dict, export_merged
    adapter.py  save_adapter / load_adapter / read_adapter_config in PEFT's on-disk format
"""
from .adapter import AdapterError, load_adapter, read_adapter_config, save_adapter
from .export import dequantize_model, export_merged, merged_state_dict
from .inject import (count_parameters, disable_lora, format_trainable, inject_lora, lora_layers,
                     lora_parameters, merge_lora, unmerge_lora, unwrap_lora)
from .layer import LoRALinear

__all__ = ["LoRALinear", "inject_lora", "lora_layers", "lora_parameters", "count_parameters",
           "format_trainable", "merge_lora", "unmerge_lora", "unwrap_lora", "disable_lora",
           "dequantize_model", "merged_state_dict", "export_merged",
           "save_adapter", "load_adapter", "read_adapter_config", "AdapterError"]
