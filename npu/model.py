"""The Qwen3 / Llama forward over a flattened ragged batch, on any backend.

One step is any mix of prefill chunks and decode tokens: tokens of all sequences are concatenated,
each with its position and KV slot. Per layer, every token's K/V is written to the paged cache first,
then each sequence attends over its own slots through its block table, so a sequence can read
blocks another sequence of the same step wrote (prefix sharing within a step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loaders.config import ModelConfig
from loaders.transforms import OnlineTransforms
from loaders.weights import LayerWeights, ModelWeights
from npu.backends.base import Backend, DecoderStackInputs, RMSNorm
from npu.kv_cache import PagedKVCache
from npu.rope import rope_tables


@dataclass
class SeqSpan:
    """One sequence's part of a step: its query rows and the KV slots it attends over."""

    q_start: int  # first row of this sequence in the flattened batch
    q_len: int
    context_slots: torch.Tensor  # [ctx] slots of all tokens up to and including this chunk


@dataclass
class DecodeGroup:
    """Single-token (decode) sequences of a step, attended in one batched call.

    Contexts are padded to the longest; padded keys read slot 0 and are ignored (``lengths``).
    """

    rows: torch.Tensor  # [S] rows of the flattened batch
    slots: torch.Tensor  # [S, L] context slots, padded
    lengths: torch.Tensor  # [S] int32 context lengths
    covers_all_rows: bool  # rows are exactly 0..S-1 of an S-row step (a pure decode step)

    @staticmethod
    def build(spans: list[SeqSpan], total_rows: int) -> DecodeGroup:
        longest = max(sp.context_slots.numel() for sp in spans)
        slots = torch.zeros(len(spans), longest, dtype=torch.long)
        lengths = torch.tensor([sp.context_slots.numel() for sp in spans], dtype=torch.int32)
        for i, sp in enumerate(spans):
            slots[i, : sp.context_slots.numel()] = sp.context_slots
        starts = [sp.q_start for sp in spans]
        covers = total_rows == len(spans) and starts == list(range(len(spans)))
        return DecodeGroup(torch.tensor(starts), slots, lengths, covers)

    def to(self, device: torch.device) -> DecodeGroup:
        return DecodeGroup(self.rows.to(device), self.slots.to(device), self.lengths.to(device), self.covers_all_rows)


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, where each token's K/V is written
    seqs: list[SeqSpan]
    logits_rows: torch.Tensor  # [S] rows whose next-token logits are needed
    decode: DecodeGroup | None = None  # set by :meth:`group_decodes`

    def to(self, device: torch.device) -> ForwardBatch:
        """The batch with its tensors on ``device`` (itself where they are there already)."""
        if self.token_ids.device == device:
            return self
        return ForwardBatch(
            token_ids=self.token_ids.to(device),
            positions=self.positions.to(device),
            slot_mapping=self.slot_mapping.to(device),
            seqs=[SeqSpan(sp.q_start, sp.q_len, sp.context_slots.to(device)) for sp in self.seqs],
            logits_rows=self.logits_rows.to(device),
            decode=None if self.decode is None else self.decode.to(device),
        )

    def group_decodes(self) -> None:
        """Attend the step's single-token (decode) queries in one batched call (the backend's
        ``decode_attention``) instead of one by one."""
        decodes = [sp for sp in self.seqs if sp.q_len == 1]
        if decodes:
            self.decode = DecodeGroup.build(decodes, self.token_ids.numel())
            self.seqs = [sp for sp in self.seqs if sp.q_len != 1]


class _Layer:
    def __init__(
        self,
        weights: LayerWeights,
        cfg: ModelConfig,
        backend: Backend,
        dtype: torch.dtype,
        online: OnlineTransforms,
    ):
        lin = weights.linears
        # FloatLinear and Int8Linear both concatenate along the output dimension exactly.
        concat = type(lin["self_attn.q_proj"]).concat
        self.qkv = backend.prepare_linear(
            concat([lin["self_attn.q_proj"], lin["self_attn.k_proj"], lin["self_attn.v_proj"]])
        )
        self.o = backend.prepare_linear(lin["self_attn.o_proj"])
        self.gate_up = backend.prepare_linear(concat([lin["mlp.gate_proj"], lin["mlp.up_proj"]]))
        # (a rotated checkpoint's R4: silu(gate) * up times a block-diagonal Hadamard, in the linear's prologue)
        self.down = backend.prepare_linear(lin["mlp.down_proj"], input_hadamard=online.down_proj_input_block or 0)
        # (and its R3: q and k times a per-head Hadamard after RoPE, in the q/k norm + RoPE kernel)
        self.qk_hadamard = online.qk_head_hadamard
        norms = {k: v.to(device=backend.device, dtype=dtype).contiguous() for k, v in weights.norms.items()}
        self.input_norm = RMSNorm(norms["input_layernorm"], cfg.rms_norm_eps)
        self.post_norm = RMSNorm(norms["post_attention_layernorm"], cfg.rms_norm_eps)
        # Optional part of the attention block: Qwen3 has per-head q/k RMSNorm, Llama does not.
        # q and k heads are adjacent in the fused qkv output, so one norm call covers both with a
        # [heads, head_dim] weight (q_norm repeated over q heads, then k_norm over kv heads).
        self.qk_norm = None
        if "self_attn.q_norm" in norms:
            q_heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
            self.qk_norm = RMSNorm(
                torch.cat(
                    [norms["self_attn.q_norm"].expand(q_heads, -1), norms["self_attn.k_norm"].expand(kv_heads, -1)]
                ),
                cfg.rms_norm_eps,
            )


class DecoderModel:
    """Prepared weights plus the forward pass (Qwen3 and Llama); owns nothing but weights (the cache is passed in)."""

    def __init__(self, weights: ModelWeights, backend: Backend, max_positions: int):
        """Prepares (packs) every layer of ``weights`` for ``backend``, taking each loaded layer out of
        ``weights`` as soon as it is packed, so that a model is never held twice (a 14B model's INT8 weights
        are over half of a 24 GB machine)."""
        cfg = weights.config
        self.cfg, self.backend = cfg, backend
        self.dtype = backend.activation_dtype
        self.device = backend.device
        self.embed = weights.embed_tokens.to(self.device)
        self.layers = []
        for i, lw in enumerate(weights.layers):
            weights.layers[i] = None  # type: ignore[call-overload]
            self.layers.append(_Layer(lw, cfg, backend, self.dtype, weights.online))
            del lw
        self.final_norm = RMSNorm(
            weights.final_norm.to(device=self.device, dtype=self.dtype).contiguous(), cfg.rms_norm_eps
        )
        lm_head, weights.lm_head = weights.lm_head, None  # type: ignore[assignment]
        self.lm_head = backend.prepare_linear(lm_head)
        del lm_head
        self.scale = cfg.head_dim**-0.5
        # RoPE tables of the checkpoint's RoPE type, computed exactly as transformers does (npu/rope.py).
        cos, sin = rope_tables(cfg.rope, cfg.head_dim, max_positions)
        half = cfg.head_dim // 2
        # rotate_half(x) * sin == roll(x, d/2) * [-sin, sin] (see TorchOps.qk_norm_rope)
        self.cos = cos.to(device=self.device, dtype=self.dtype)
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(device=self.device, dtype=self.dtype)
        # the backend's one-call version of the layer loop for pure decode steps, where it has one
        self.decode_stack = backend.prepare_decoder_stack(
            DecoderStackInputs(
                self.layers,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                self.cos,
                self.sin_signed,
                self.scale,
                layer_loop=lambda x, batch, cache: self._layer_loop(x, batch, cache, None),
            )
        )

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, cache: PagedKVCache, layer_outputs: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Compute the batch, writing its K/V into ``cache``; returns fp32 logits ``[S, vocab]`` on the host
        (the sampler's side), whatever the backend's device.

        ``layer_outputs``, when given, receives the residual stream after each layer (for tests).
        """
        batch = batch.to(self.device)
        x = self.embed[batch.token_ids].to(self.dtype)
        group = batch.decode
        stacked = (
            self.decode_stack is not None
            and layer_outputs is None
            and group is not None
            and group.covers_all_rows
            and self.decode_stack.decode(x, batch.positions, batch.slot_mapping, group.slots, group.lengths, cache)
        )
        if not stacked:
            x = self._layer_loop(x, batch, cache, layer_outputs)
        return self.lm_head(x[batch.logits_rows], norm=self.final_norm).float().cpu()

    def _layer_loop(
        self, x: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache, layer_outputs: list[torch.Tensor] | None
    ) -> torch.Tensor:
        """Every decoder layer on the residual stream ``x`` ``[T, hidden]``, kernel call by kernel call."""
        cfg = self.cfg
        T = batch.token_ids.numel()
        ops = self.backend
        q_size, kv_size = cfg.q_size, cfg.kv_size
        qk_heads = cfg.num_heads + cfg.num_kv_heads
        # One buffer for each layer's q/k/v and gate/up outputs, which die within the layer: allocated
        # once per step, as fresh multi-MB allocations page-fault on every use.
        qkv_buf = torch.empty(T, self.layers[0].qkv.out_features, dtype=self.dtype, device=self.device)
        gate_up_buf = torch.empty(T, self.layers[0].gate_up.out_features, dtype=self.dtype, device=self.device)
        for li, layer in enumerate(self.layers):
            qkv = layer.qkv(x, norm=layer.input_norm, out=qkv_buf)
            qk = qkv[:, : q_size + kv_size].view(T, qk_heads, cfg.head_dim)
            v = qkv[:, q_size + kv_size :].view(T, cfg.num_kv_heads, cfg.head_dim)
            # per-head q/k norm (Qwen3; absent in Llama) and RoPE on q and k heads at once (then R3, if any)
            qk = ops.qk_norm_rope(qk, layer.qk_norm, self.cos, self.sin_signed, batch.positions, layer.qk_hadamard)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
            ops.write_kv(cache, li, batch.slot_mapping, k, v)
            attn = self._attend(q, li, batch, cache)
            x = layer.o(attn, residual=x)
            gu = layer.gate_up(x, norm=layer.post_norm, out=gate_up_buf)
            x = layer.down(gu, gated=True, residual=x)
            if layer_outputs is not None:
                layer_outputs.append(x)
        return x

    def _attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Attention output ``[T, Hq * D]`` of every query row of the step: the one place that chooses the path.

        Single-token (decode) rows go to the backend's decode attention in one call, each prompt chunk to its
        prefill attention; a pure decode step needs no gather or scatter of rows."""
        ops, group = self.backend, batch.decode
        if group is not None and group.covers_all_rows:
            return ops.decode_attention(q, cache, layer, group.slots, group.lengths, self.scale)
        attn = torch.empty(q.shape[0], self.cfg.q_size, dtype=self.dtype, device=self.device)
        for span in batch.seqs:
            rows = slice(span.q_start, span.q_start + span.q_len)
            attn[rows] = ops.prefill_attention(q[rows], cache, layer, span.context_slots, self.scale)
        if group is not None:
            attn[group.rows] = ops.decode_attention(q[group.rows], cache, layer, group.slots, group.lengths, self.scale)
        return attn
