"""The Qwen3 / Llama forward over a flattened ragged batch, on any backend.

One step is any mix of prefill chunks and decode tokens: tokens of all sequences are concatenated,
each with its position and KV slot. Per layer, every token's K/V is written to the paged cache first,
then each sequence attends over its own slots through its block table, so a sequence can read
blocks another sequence of the same step wrote (prefix sharing within a step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loaders.weights import ModelWeights
from npu.backends.base import Backend
from npu.kv_cache import PagedKVCache


@dataclass
class SeqSpan:
    """One sequence's part of a step: its query rows and the KV slots it attends over."""

    q_start: int  # first row of this sequence in the flattened batch
    q_len: int
    context_slots: torch.Tensor  # [ctx] slots of all tokens up to and including this chunk


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, where each token's K/V is written
    seqs: list[SeqSpan]
    logits_rows: torch.Tensor  # [S] rows whose next-token logits are needed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3RMSNorm: normalize in fp32, cast back, scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    def __init__(self, weights, backend: Backend, dtype: torch.dtype):
        lin = weights.linears
        # FloatLinear and Int8Linear both concatenate along the output dimension exactly.
        concat = type(lin["self_attn.q_proj"]).concat
        self.qkv = backend.prepare_linear(
            concat([lin["self_attn.q_proj"], lin["self_attn.k_proj"], lin["self_attn.v_proj"]])
        )
        self.o = backend.prepare_linear(lin["self_attn.o_proj"])
        self.gate_up = backend.prepare_linear(concat([lin["mlp.gate_proj"], lin["mlp.up_proj"]]))
        self.down = backend.prepare_linear(lin["mlp.down_proj"])
        norms = {k: v.to(dtype) for k, v in weights.norms.items()}
        self.input_norm = norms["input_layernorm"]
        self.post_norm = norms["post_attention_layernorm"]
        # Optional part of the attention block: Qwen3 has per-head q/k RMSNorm, Llama does not.
        self.q_norm = norms.get("self_attn.q_norm")
        self.k_norm = norms.get("self_attn.k_norm")


class DecoderModel:
    """Prepared weights plus the forward pass (Qwen3 and Llama); owns nothing but weights (the cache is passed in)."""

    def __init__(self, weights: ModelWeights, backend: Backend, max_positions: int):
        cfg = weights.config
        self.cfg, self.backend = cfg, backend
        self.dtype = backend.activation_dtype
        self.embed = weights.embed_tokens
        self.layers = [_Layer(lw, backend, self.dtype) for lw in weights.layers]
        self.final_norm = weights.final_norm.to(self.dtype)
        self.lm_head = backend.prepare_linear(weights.lm_head)
        self.scale = cfg.head_dim**-0.5
        self.group = cfg.num_heads // cfg.num_kv_heads
        # RoPE table, computed exactly as transformers does (fp32 inv_freq, fp32 position products).
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _attention(self, q: torch.Tensor, kv, span: SeqSpan) -> torch.Tensor:
        """Causal GQA attention of one sequence's query rows over its context (dequantized inside)."""
        cfg = self.cfg
        q_len, ctx = span.q_len, span.context_slots.numel()
        hkv, g, d = cfg.num_kv_heads, self.group, cfg.head_dim
        # [q_len, Hkv, G, D] -> [Hkv, G*q_len, D]; query head h uses kv head h // G.
        qh = q.view(q_len, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * q_len, d)
        k = kv.k.permute(1, 2, 0)  # [Hkv, D, ctx]
        scores = torch.matmul(qh, k)  # [Hkv, G*q_len, ctx]
        if kv.k_scale is not None:
            scores.mul_(kv.k_scale.t()[:, None, :])
        scores.mul_(self.scale)
        if q_len > 1:
            # query i sits at absolute position ctx - q_len + i and sees keys 0..that position.
            q_pos = torch.arange(ctx - q_len, ctx).repeat(g)
            mask = torch.arange(ctx)[None, :] > q_pos[:, None]
            scores.masked_fill_(mask[None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(self.dtype)
        if kv.v_scale is not None:
            probs.mul_(kv.v_scale.t()[:, None, :])
        out = torch.matmul(probs, kv.v.permute(1, 0, 2))  # [Hkv, G*q_len, D]
        return out.view(hkv, g, q_len, d).permute(2, 0, 1, 3).reshape(q_len, hkv * g * d)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache,
                layer_outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Compute the batch, writing its K/V into ``cache``; returns fp32 logits ``[S, vocab]``.

        ``layer_outputs``, when given, receives the residual stream after each layer (for tests).
        """
        cfg = self.cfg
        T = batch.token_ids.numel()
        x = self.embed[batch.token_ids].to(self.dtype)
        cos = self.cos[batch.positions][:, None, :]
        sin = self.sin[batch.positions][:, None, :]
        q_size, kv_size = cfg.q_size, cfg.kv_size
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(h)
            q = qkv[:, :q_size].reshape(T, cfg.num_heads, cfg.head_dim)
            k = qkv[:, q_size : q_size + kv_size].reshape(T, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, q_size + kv_size :].reshape(T, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            cache.write(li, batch.slot_mapping, k, v)
            attn = torch.empty(T, q_size, dtype=self.dtype)
            for span in batch.seqs:
                kv = cache.read(li, span.context_slots, self.dtype)
                rows = slice(span.q_start, span.q_start + span.q_len)
                attn[rows] = self._attention(q[rows].reshape(span.q_len, q_size), kv, span)
            x = x + layer.o(attn)
            h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            gu = layer.gate_up(h)
            inter = cfg.intermediate_size
            x = x + layer.down(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:])
            if layer_outputs is not None:
                layer_outputs.append(x)
        h = rms_norm(x[batch.logits_rows], self.final_norm, cfg.rms_norm_eps)
        return self.lm_head(h).float()
