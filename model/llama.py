"""A Llama-2-family decoder in plain PyTorch, small enough to read in one sitting.

The network is the one in Touvron et al. 2023 ("Llama 2") as Hugging Face lays it out:

    tokens -> embed_tokens -> N x [ x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x)) ] -> RMSNorm -> lm_head

* RMSNorm instead of LayerNorm (no mean, no bias), computed in float32.
* Rotary position embeddings in the *rotate-half* layout Hugging Face checkpoints use:
  the first and second halves of each head dimension form the (x, y) pairs being rotated.
* Grouped-query attention: ``num_key_value_heads`` <= ``num_attention_heads``; each key/value
  head serves ``num_attention_heads // num_key_value_heads`` query heads (Llama-2-7B: 32/32,
  SmolLM2-135M: 9/3).
* A SwiGLU MLP: down(silu(gate(x)) * up(x)).
* Optionally tied input/output embeddings (SmolLM2, stories260K).
* Qwen2 is the same network with biases on the q/k/v projections (``config.qkv_bias``).

Module and parameter names are exactly the Hugging Face checkpoint names
(``model.layers.0.self_attn.q_proj.weight`` ...), so a ``model.safetensors`` file loads with no
renaming table, and LoRA adapters keyed by those names are PEFT-compatible.

A static KV cache (as in gpt-fast) makes generation cost one token's work per step: the keys and
values of every past position are kept in preallocated tensors indexed by position ("slot").
Prefill writes slots [0, T) in one forward; each decode step writes one slot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with the statistics in float32 (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (B, 1, T, head_dim) for the given integer positions (B, T).

    Frequency i (of head_dim/2) turns by angle pos * theta^(-2i/head_dim). Both halves of the
    head dimension share the frequencies (rotate-half layout), hence the ``cat``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + d/2]) pair by its position's angle."""
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Preallocated keys/values for every layer position ("slot") of a batch of sequences.

    ``prefix``, when set, is the keys and values (1, H_kv, P, D) of tokens every row has before
    its own slots, kept once instead of once per row: the inference engine puts the prefix all
    its prompts share there (model/engine.py), and a decode step attends to it and then to the
    row's own slots (:func:`decode_attention`)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, H, T, D) at slots [start, start+T); return every slot written so far.

        ``start`` may also be a tensor (B,) of slots, one per row: the engine's rows have
        different lengths (model/engine.py), and row b's T new tokens go to its slots
        [start[b], start[b]+T). Then the first ``end`` slots are returned, and the attention
        mask says which of them each row's queries see."""
        if isinstance(start, torch.Tensor):
            B, _, T, _ = k.shape
            rows = torch.arange(B, device=k.device)[:, None]
            at = start[:, None] + torch.arange(T, device=k.device)  # (B, T): each new token's slot
            self.k[rows, :, at] = k.transpose(1, 2).to(self.k.dtype)  # the engine's CPU cache is float32
            self.v[rows, :, at] = v.transpose(1, 2).to(self.v.dtype)
            return self.k[:, :, :end], self.v[:, :, :end]
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, start_pos: int | torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start_pos is not None:
            k, v = self.cache.update(start_pos, k, v, None if mask is None else mask.shape[-1])
        prefix = None if self.cache is None else self.cache.prefix
        per_row = isinstance(start_pos, torch.Tensor)  # the engine's decode step: a row's token (+ drafts)
        if prefix is not None and T > 1 and not per_row:
            raise ValueError("a cache's shared prefix serves decode steps (a token per row, and its drafts) only")
        if prefix is not None or (x.device.type == "cpu" and (T == 1 or per_row)):  # see decode_attention
            return self.o_proj(decode_attention(q, k, v, mask, prefix).transpose(1, 2).reshape(B, T, -1))
        # Without a mask, a causal mask is only needed when queries see their own block of keys.
        causal = mask is None and T > 1 and k.shape[2] == T
        # Grouped-query attention: each kv head serves n_heads / n_kv_heads consecutive q heads.
        # enable_gqa lets SDPA index the shared kv heads instead of copying them per q head
        # (repeat_interleave), which on a decode step costs more than the attention itself.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention for a decode step's few queries per row, as float32 matmuls.

    q (B, H, T, D): one query per row (T == 1), or a row's last token and the draft tokens after
    it (the engine's prompt-lookup drafts); k, v (B, H_kv, S, D); mask None (T == 1 only) or
    (B, 1, T, S), boolean (True = may see) or additive (0 / -inf), causal within the T queries.
    Each kv head serves its G = H / H_kv query heads as one (G*T, D) block, so grouped-query
    attention needs no copy of the keys. Why not SDPA: on a CPU its bf16 kernel takes most of a
    decode step for one query per row (docs/benchmarks.md: a Qwen2-1.5B step at 8 rows x 1,800
    cached keys took 939 ms with SDPA, 539 ms with this), and float32 keeps SDPA's accuracy,
    which also accumulates scores in float32. For a block of queries (prefill) SDPA is the faster
    one, and on a GPU a step without a prefix stays with it.

    ``prefix`` (keys, values of shape (1, H_kv, P, D)) is what every row sees before its own S
    keys (:class:`KVCache`), all of it, whatever the query. All rows' queries meet its one copy
    in one (B*G*T, D) x (D, P) matmul per kv head, instead of each row reading a copy of its
    own, and one softmax runs over the P prefix scores and the row's S: the same attention as
    over the row's P + S keys."""
    B, H, T, D = q.shape
    if mask is None and T > 1:
        raise ValueError("decode_attention: several queries per row need a mask (causal within them)")
    kv_heads, S = k.shape[1], k.shape[2]
    G, dtype = H // kv_heads, q.dtype
    q = q.reshape(B, kv_heads, G * T, D).float() * D ** -0.5  # head h = kv head h // G, group h % G
    scores = (q @ k.float().transpose(-1, -2)).view(B, kv_heads, G, T, S)
    if mask is not None:
        mask = mask.reshape(B, 1, 1, T, S)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    if prefix is None:
        return (scores.softmax(-1).view(B, kv_heads, G * T, S) @ v.float()).reshape(B, H, T, D).to(dtype)
    pk, pv = prefix[0][0].float(), prefix[1][0].float()  # (H_kv, P, D)
    P, rows = pk.shape[1], B * G * T
    shared = (q.transpose(0, 1).reshape(kv_heads, rows, D) @ pk.transpose(-1, -2)).view(kv_heads, B, G, T, P)
    probs = torch.cat([shared.transpose(0, 1), scores], -1).softmax(-1)  # (B, H_kv, G, T, P + S)
    y = (probs[..., :P].transpose(0, 1).reshape(kv_heads, rows, P) @ pv).view(kv_heads, B, G * T, D).transpose(0, 1)
    own = probs[..., P:].reshape(B, kv_heads, G * T, S) @ v.float()
    return (y + own).reshape(B, H, T, D).to(dtype)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, start_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The transformer body (``model.*`` in checkpoints)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask_4d(key_mask: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: query at slot start+t may see key slot s iff s <= start+t and
    key s is not padding. A query always sees itself, so a padding query (left padding) attends to
    something and its (ignored) output is finite rather than NaN."""
    S = key_mask.shape[1]
    q_slots = torch.arange(start, start + T, device=key_mask.device)[:, None]
    k_slots = torch.arange(S, device=key_mask.device)[None, :]
    allowed = (k_slots <= q_slots)[None] & key_mask[:, None, :].bool()
    return (allowed | (k_slots == q_slots)[None])[:, None]


class Llama(nn.Module):
    """Llama causal language model: ``logits = Llama(config)(input_ids)``.

    ``forward`` has three uses:
    * training / scoring: ``model(ids, attention_mask)`` over whole (right-padded) sequences;
    * prefill: ``model(ids, attention_mask, position_ids, start_pos=0)`` after ``setup_cache``;
    * decode: ``model(next_ids[:, None], attention_mask, position_ids, start_pos=t)``.
    ``attention_mask`` (B, S) marks real tokens (1) vs padding (0) over every slot seen so far.
    For decode, ``start_pos`` may be a tensor (B,): each row's own first slot for its new tokens
    (one, or a few: a token and the drafts after it), as the inference engine's rows have
    different lengths (model/engine.py).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    # --- KV cache -----------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a fresh cache for ``batch`` sequences of up to ``max_len`` tokens."""
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = self.model.embed_tokens.weight.device
        for layer in self.model.layers:
            a = layer.self_attn
            a.cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None

    # --- forward ------------------------------------------------------------------------
    def decode_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor) -> torch.Tensor:
        """One decode step, written for ``torch.compile`` (see model/compiled.py): last-position
        logits (B, vocab) for one new token per row, the token's key/value going to cache slot S-1.

        It computes what ``forward(input_ids, attention_mask, position_ids, start_pos=S-1)`` does,
        but without Python branches on tensor values (``forward`` asks ``attention_mask.all()`` to
        skip the mask when nothing is padded), so it compiles to one graph. The step number is not
        a Python int either: it is the length S of ``attention_mask`` (B, S), which marks real
        tokens (1) vs padding (0) over every slot so far. A compiler told that this dimension is
        dynamic then makes one program that serves every step and every prompt length.
        """
        start = attention_mask.shape[1] - 1
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): one query per row
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, start)
        return self.lm_head(self.model.norm(x[:, -1]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, start_pos: int | torch.Tensor | None = None,
                last_only: bool = False, return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position with ``last_only``.

        ``return_hidden=True`` stops before the output head and returns the final normed hidden
        states (B, T, hidden): training feeds them to ``model.lm_loss.fused_lm_loss``, which puts
        only the labelled positions through the head, a chunk at a time."""
        B, T = input_ids.shape
        per_row = isinstance(start_pos, torch.Tensor)  # the engine's decode step: rows of different lengths
        if per_row and (attention_mask is None or position_ids is None):
            raise ValueError("per-row start_pos: give attention_mask and position_ids")
        start = 0 if per_row else (start_pos or 0)
        if position_ids is None:
            if attention_mask is not None and start_pos is None:
                # Left padding: a row's first real token is position 0 (cumsum - 1, as torchtune).
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = None
        if per_row:  # row b's T queries sit at slots start_pos[b] + t; the key mask marks its own slots
            slots = torch.arange(attention_mask.shape[1], device=x.device)
            sees = (attention_mask != 0)[:, None, :] & (slots <= start_pos[:, None, None] + torch.arange(
                T, device=x.device)[None, :, None])  # (B, T, S): its own slots, causal within the T
            # additive (0 / -inf) in the compute dtype, made once here rather than in every layer
            mask = torch.zeros(sees.shape, dtype=x.dtype, device=x.device).masked_fill(~sees, float("-inf"))[:, None]
        elif attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask_4d(attention_mask, start, T)
        elif T > 1 and start > 0:  # a block of queries after cached keys: causal with an offset
            mask = attention_mask_4d(torch.ones(B, start + T, device=input_ids.device), start, T)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, start_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, start_pos)
        x = self.model.norm(x)
        if return_hidden:
            return x
        if last_only:
            # contiguous: a strided 3-D input sends F.linear down a batched-matmul path that
            # copies the whole (vocab x hidden) weight once per row.
            x = x[:, -1:].contiguous()
        return self.lm_head(x)
