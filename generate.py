"""Decoding for the LLM of llm.py: a preallocated (static) KV cache, greedy / top-p sampling, and the
generate loop (docs/design.md §10: greedy answers in left-padded batches)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits (B, V) -> ids (B,): argmax, or sampling from the smallest top-p nucleus at `temperature`."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, ids = F.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)
    probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)  # the top token always survives
    return ids.gather(-1, torch.multinomial(probs, 1))[:, 0]


def _grow(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """t zero-padded along `dim` to `size`."""
    pad = list(t.shape)
    pad[dim] = size - t.shape[dim]
    return torch.cat((t, t.new_zeros(pad)), dim=dim)


@dataclass
class KVCache:
    """Keys and values of every block in buffers preallocated for `capacity` tokens: a forward writes its
    new tokens in place (no concatenation per decoding step) and attends over views of the first
    `length`. The cache is extended in place; it reallocates only when a forward brings more tokens than it
    has room for (a cache started by a plain forward holds exactly its tokens)."""

    mask: torch.Tensor  # (B, capacity) True = real token
    length: int = 0  # tokens seen so far
    keys: list[torch.Tensor] = field(default_factory=list)  # per block (B, n_kv_heads, capacity, head_dim)
    values: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, batch: int, capacity: int, device: torch.device) -> KVCache:
        return cls(torch.zeros(batch, capacity, dtype=torch.bool, device=device))

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block: the keys and values seen so far, (B, n_kv_heads, length, head_dim) views."""
        return [(k[:, :, : self.length], v[:, :, : self.length]) for k, v in zip(self.keys, self.values)]

    def append_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Record the new tokens' mask (B, T), making room for them. -> the mask of every token (B, S)"""
        end = self.length + mask.shape[1]
        if end > self.capacity:
            self.mask = _grow(self.mask, 1, end)
        self.mask[:, self.length : end] = mask
        return self.mask[:, :end]

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store block `block`'s new keys / values (B, n_kv_heads, T, head_dim) after the first `length`.
        -> every key and value so far (B, n_kv_heads, length + T, head_dim), views of the buffers"""
        if block == len(self.keys):  # first write of this block: allocate in the keys' dtype
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        elif self.keys[block].shape[2] < self.capacity:  # the mask grew: so do the buffers
            self.keys[block] = _grow(self.keys[block], 2, self.capacity)
            self.values[block] = _grow(self.values[block], 2, self.capacity)
        end = self.length + k.shape[2]
        self.keys[block][:, :, self.length : end] = k
        self.values[block][:, :, self.length : end] = v
        return self.keys[block][:, :, :end], self.values[block][:, :, :end]


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_ids: tuple[int, ...] | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Prefill the (left-padded) prompts, then decode one token per step with a KV cache preallocated for
    prompt + max_new_tokens. Greedy when temperature == 0, else temperature + top-p sampling. Returns
    (B, n_new) ids; rows that hit EOS early are filled with the pad id; stops when every row has."""
    x = input_ids if inputs_embeds is None else inputs_embeds
    (B, T), device = x.shape[:2], x.device
    if attention_mask is not None and not attention_mask[:, -1].bool().all():
        raise ValueError("generate needs left padding: attention_mask[:, -1] must be all True")
    config = model.config
    eos_token_ids = config.eos_token_ids if eos_token_ids is None else eos_token_ids
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    pad = config.pad_token_id if config.pad_token_id is not None else int(eos[0]) if len(eos) else 0
    last = (torch.arange(T, device=device) == T - 1).expand(B, -1)  # (B, T): logits at the last position
    cache = KVCache.empty(B, T + max_new_tokens, device)
    out = model(input_ids, inputs_embeds, attention_mask, logits_mask=last, kv_cache=cache, use_cache=True)
    logits, done, tokens = out.logits, torch.zeros(B, dtype=torch.bool, device=device), []  # (B, V)
    for _ in range(max_new_tokens):
        next_id = sample(logits, temperature, top_p).masked_fill(done, pad)  # (B,)
        tokens.append(next_id)
        if streamer is not None:
            streamer(next_id)
        done |= torch.isin(next_id, eos)
        if done.all():
            break
        logits = model(next_id[:, None], kv_cache=cache, use_cache=True).logits[:, -1]
    return torch.stack(tokens, 1) if tokens else torch.empty(B, 0, dtype=torch.long, device=device)
