"""The decoder LLM of OLA-VLM: Llama-3-8B(-Instruct) or Phi-3-mini-4k (Sec. 5.1). One `Block` class serves
both; Phi-3 differs only in its checkpoint layout (fused `qkv_proj` / `gate_up_proj`, split by
`LLM.from_pretrained`) and its sliding window. Numerics follow docs/design.md §8: RMSNorm in fp32,
rotate-half RoPE with fp32 cos/sin, grouped-query attention, SwiGLU MLP; decoding (the static KV cache,
`generate`, `sample`) lives in generate.py."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from generate import KVCache, generate, sample
from weights import load_strict, read_json, read_state_dict, save_with_table

__all__ = ["LLM", "LLMConfig", "KVCache", "sample"]


# ------------------------------------------------------------------------------------ config
@dataclass
class LLMConfig:
    """Decoder hyper-parameters; the defaults are Meta-Llama-3-8B-Instruct (docs/design.md §8)."""

    model_type: str = "llama"  # 'llama' | 'phi3' (only the checkpoint layout differs)
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None  # None -> hidden_size // n_heads
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # Llama-3.1 'llama3' scaling, else None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Phi-3: query i sees keys j with i - W < j <= i
    max_position_embeddings: int = 8192
    bos_token_id: int | None = 128000
    eos_token_ids: tuple[int, ...] = (128009, 128001)  # <|eot_id|>, <|end_of_text|>
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in ("llama", "phi3"):
            raise ValueError(f"model_type {self.model_type!r} is not supported (expected 'llama' or 'phi3')")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        self.head_dim = self.head_dim or self.hidden_size // self.n_heads
        self.eos_token_ids = tuple(self.eos_token_ids)

    @classmethod
    def preset(cls, name: str) -> LLMConfig:
        """'llama3-8b' | 'phi3-mini-4k' | 'tiny' (the built-in CPU training size; callers set
        vocab_size and the special ids from their tokenizer with `dataclasses.replace`)."""
        presets = {
            "llama3-8b": cls(),
            "phi3-mini-4k": cls(
                model_type="phi3",
                vocab_size=32064,
                hidden_size=3072,
                intermediate_size=8192,
                n_kv_heads=32,
                rope_theta=10000.0,
                sliding_window=2047,
                max_position_embeddings=4096,
                bos_token_id=1,
                eos_token_ids=(32000, 32001, 32007),
                pad_token_id=32000,
            ),
            "tiny": cls(
                vocab_size=512,
                hidden_size=128,
                intermediate_size=256,
                n_layers=8,
                n_heads=4,
                n_kv_heads=2,
                max_position_embeddings=4096,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown LLM preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LLMConfig:
        """Build from a Hugging Face `config.json` (Hub / transformers-4 layout with `rope_theta` +
        `rope_scaling`, or transformers-5 `rope_parameters`). EOS ids of a `generation_config.json`
        next to it are added (Phi-3 chat turns end with <|end|>, which only that file lists)."""
        path = Path(path)
        cfg = read_json(path)
        if cfg.get("model_type") not in ("llama", "phi3"):
            raise ValueError(
                f"{path}: model_type {cfg.get('model_type')!r} is not supported (expected 'llama' or 'phi3')"
            )
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "rms_norm_eps",
        )
        if missing := [k for k in required if k not in cfg]:
            raise ValueError(f"{path}: missing field(s) {missing}")
        rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        act = cfg.get("hidden_act", "silu")
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        # (biases need no check: strict loading reports them as unexpected keys)
        if act != "silu" or partial != 1:
            raise ValueError(
                f"{path}: hidden_act={act!r}, partial_rotary_factor={partial} is not supported "
                f"(expected 'silu', 1.0)"
            )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"{path}: rope type {rope_type!r} is not supported (expected 'default' or 'llama3')"
            )
        llama3_keys = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        if rope_type == "llama3" and not llama3_keys <= rope.keys():
            raise ValueError(f"{path}: llama3 rope scaling needs {sorted(llama3_keys)}, found {sorted(rope)}")
        eos = []
        for f in (path, path.parent / "generation_config.json"):
            e = read_json(f).get("eos_token_id") if f.exists() else None
            if isinstance(e, int):
                eos.append(e)
            elif e is not None:
                eos += list(e)
        return cls(
            model_type=cfg["model_type"],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            rope_theta=float(theta),
            rope_scaling={k: rope[k] for k in llama3_keys} if rope_type == "llama3" else None,
            rms_norm_eps=cfg["rms_norm_eps"],
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=cfg.get("sliding_window") if cfg["model_type"] == "phi3" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            pad_token_id=cfg.get("pad_token_id"),
        )


# ------------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32, scale in the model dtype
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(config: LLMConfig) -> torch.Tensor:
    """inv_freq (head_dim/2,) fp32, with Llama-3.1 'llama3' rescaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)
    s = config.rope_scaling
    # wavelengths above orig/low_freq_factor are divided by `factor`, below orig/high kept, blended between
    if s:
        wavelen = 2 * math.pi / inv_freq
        lo = s["low_freq_factor"]
        hi = s["high_freq_factor"]
        smooth = ((s["original_max_position_embeddings"] / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    return inv_freq


def rope_cos_sin(config: LLMConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, head_dim) in fp32 (rotate-half layout).
    Recomputed each forward from the config: no buffer to go stale under meta init or .to(dtype)."""
    freqs = positions[..., None].float() * rope_frequencies(config).to(positions.device)  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, D) -> x·cos + rotate_half(x)·sin, rotate_half(x) = (-x2, x1); computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def attention_mask_4d(mask: torch.Tensor, n_new: int, window: int | None) -> torch.Tensor:
    """mask (B, S) True = real token, for all S tokens seen (cached + new) -> (B, 1, n_new, S) bool,
    True = may attend. Causal + padding (+ sliding window); every query sees itself, so padding
    queries never get an empty softmax row (NaN)."""
    S = mask.shape[1]
    q = torch.arange(S - n_new, S, device=mask.device)[:, None]  # (n_new, 1) sequence index of each query
    k = torch.arange(S, device=mask.device)[None]  # (1, S)
    allowed = (k <= q) & mask[:, None, None, :]
    if window:
        allowed = allowed & (k > q - window)
    return allowed | (k == q)


def attention_plan(mask: torch.Tensor, n_new: int, window: int | None) -> torch.Tensor | None:
    """The attention mask to materialise, or None where plain causal attention is exact (docs/design.md §8):
    no cache and right padding (training: real queries only see real keys; pad rows are never read), or one
    new token and no padding (decoding). A sliding window only matters beyond `window` tokens."""
    S = mask.shape[1]
    if window is None or window >= S:
        if n_new == S and bool((mask[:, 1:] <= mask[:, :-1]).all()):
            return None
        if n_new == 1 and bool(mask.all()):
            return None
    return attention_mask_4d(mask, n_new, window)


class Attention(nn.Module):
    """Grouped-query attention: n_kv_heads key/value heads shared by n_heads query heads."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.n_rep = c.n_heads // c.n_kv_heads
        self.q_proj = nn.Linear(c.hidden_size, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, index: int = 0):
        """mask (B, 1, T, S) bool, or None: causal (T > 1) / every key (T = 1), see `attention_plan`."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # every key / value so far: (B, KV, S, D)
            k, v = cache.write(index, k, v)
        # each KV head serves n_rep consecutive query heads (the reference's repeat_kv)
        if T == 1 and self.n_rep > 1:  # decoding: a KV head's n_rep queries as one query axis, no KV copy
            y = F.scaled_dot_product_attention(
                q.reshape(B, -1, self.n_rep, self.head_dim), k, v, attn_mask=mask
            )
        elif mask is None or x.device.type == "cpu":  # SDPA's enable_gqa: no copy where the kernel takes it
            causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        else:  # masked GPU kernels would fall back to math with enable_gqa: copy the KV heads
            kr, vr = k.repeat_interleave(self.n_rep, dim=1), v.repeat_interleave(self.n_rep, dim=1)
            y = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)  # (B, H, T, D)
        return self.o_proj(y.reshape(B, -1, T, self.head_dim).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block (Llama and Phi-3 alike)."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, index: int = 0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, index)
        return x + self.mlp(self.mlp_norm(x))


# ------------------------------------------------------------------------------------ model
@dataclass
class LLMOutput:
    logits: torch.Tensor  # (B, T, V), or (N, V) with a logits_mask
    hidden_states: tuple[torch.Tensor, ...] | None  # n_layers + 1 tensors (B, T, H)
    kv_cache: KVCache | None


# Our parameter name -> its (Llama, Phi-3) name in the Hub checkpoints (docs/design.md §8); {i} = block.
# Phi-3 fuses q|k|v and gate|up: our names that share one checkpoint tensor take its rows in table order.
HF_KEYS = {
    "embed_tokens.weight": ("model.embed_tokens.weight",) * 2,
    "layers.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight",) * 2,
    "layers.{i}.attn.q_proj.weight": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.qkv_proj.weight",
    ),
    "layers.{i}.attn.k_proj.weight": (
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.qkv_proj.weight",
    ),
    "layers.{i}.attn.v_proj.weight": (
        "model.layers.{i}.self_attn.v_proj.weight",
        "model.layers.{i}.self_attn.qkv_proj.weight",
    ),
    "layers.{i}.attn.o_proj.weight": ("model.layers.{i}.self_attn.o_proj.weight",) * 2,
    "layers.{i}.mlp_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",) * 2,
    "layers.{i}.mlp.gate_proj.weight": (
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.gate_up_proj.weight",
    ),
    "layers.{i}.mlp.up_proj.weight": (
        "model.layers.{i}.mlp.up_proj.weight",
        "model.layers.{i}.mlp.gate_up_proj.weight",
    ),
    "layers.{i}.mlp.down_proj.weight": ("model.layers.{i}.mlp.down_proj.weight",) * 2,
    "norm.weight": ("model.norm.weight",) * 2,
    "lm_head.weight": ("lm_head.weight",) * 2,  # absent when tie_word_embeddings
}


class LLM(nn.Module):
    """Decoder-only LM: embed_tokens -> n_layers Blocks -> norm -> lm_head (or the tied embedding)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward (training only)
        for m in self.modules():  # N(0, 0.02) like the reference's initializer_range
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
    ) -> LLMOutput:
        """attention_mask (B, T) True/1 = real token, for the T new tokens only (the cache keeps the
        past). hidden_states: [0] embeddings, [k] output of block k, [-1] after the final norm.
        `kv_cache` is extended in place (use_cache without one starts a cache holding these T tokens)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T = x.shape[:2]
        mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            mask = attention_mask.bool()
        if use_cache and kv_cache is None:
            kv_cache = KVCache.empty(B, T, x.device)
        if kv_cache is not None:
            mask = kv_cache.append_mask(mask)  # (B, S): cached + new
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]  # real tokens count 0, 1, ... like the
        # reference's generate with left padding (RoPE is relative: the offset only changes rounding)
        cos, sin = rope_cos_sin(self.config, positions)
        attn_mask = attention_plan(mask, T, self.config.sliding_window)  # (B, 1, T, S) or None: causal
        hidden = [x]
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, attn_mask, kv_cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, kv_cache, i)
            hidden += [x] if output_hidden_states else []
        if kv_cache is not None:
            kv_cache.length += T
        x = self.norm(x)
        if output_hidden_states:
            hidden[-1] = x  # reference convention: the last entry is normed
        if logits_mask is not None:
            x = x[logits_mask.bool()]  # (N, H): e.g. answer positions only
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return LLMOutput(
            F.linear(x, head),
            tuple(hidden) if output_hidden_states else None,
            kv_cache if use_cache else None,
        )

    generate = generate  # greedy / top-p decoding with a static KV cache (generate.py), self = the model

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> LLM:
        """Load a Hugging Face Llama / Phi-3 folder (config.json + safetensors, sharded or not).
        Built on the meta device and materialised once in `dtype` on `device`; strict keys."""
        path = Path(path)
        config = LLMConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model = model.to_empty(device=device)
        rows = {k: v.shape[0] for k, v in model.state_dict().items()}
        col, names = int(config.model_type == "phi3"), {}  # our key -> checkpoint key
        for ours, hf in HF_KEYS.items():
            for i in range(config.n_layers) if "{i}" in ours else [0]:
                if ours.format(i=i) in rows:
                    names[ours.format(i=i)] = hf[col].format(i=i)
        ours_of = {}  # checkpoint key -> our key(s), in row order
        for ours, hf in names.items():
            ours_of.setdefault(hf, []).append(ours)
        state = {}
        for hf, t in read_state_dict(path).items():
            ours = ours_of.get(hf, [hf])  # unknown keys stay as they are -> reported unexpected
            if len(ours) == 1:
                state[ours[0]] = t
                continue
            sizes = [rows[k] for k in ours]  # Phi-3: q|k|v by head counts, gate|up
            if t.shape[0] != sum(sizes):
                raise ValueError(
                    f"cannot load {path}: fused {hf} has shape {list(t.shape)}, expected "
                    f"{' + '.join(map(str, sizes))} rows for {', '.join(ours)}"
                )
            state.update(zip(ours, t.split(sizes)))
        return load_strict(model, state, path, names).eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a Hub LlamaForCausalLM folder (config.json + model.safetensors) that from_pretrained (and
        transformers) reads; the tokenizer is the caller's to add."""
        c = self.config
        if c.model_type != "llama":
            raise ValueError(f"save_pretrained writes the Llama layout, not {c.model_type!r}")
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "rope_theta": c.rope_theta,
            "rope_scaling": {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else None,
            "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "max_position_embeddings": c.max_position_embeddings,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": list(c.eos_token_ids),
            "pad_token_id": c.pad_token_id,
            "attention_bias": False,
            "mlp_bias": False,
        }
        save_with_table(self, folder, [(ours, hf[0]) for ours, hf in HF_KEYS.items()], config)
