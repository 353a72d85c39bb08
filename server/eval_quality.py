"""``a8w8-serve eval-quality``: what A8W8 and the INT8 KV cache cost in quality on a real model.

Perplexity on a fixed committed text (``loaders/assets/eval/prose.txt``, self-written prose) and greedy
agreement over 64 tokens for 20 fixed prompts, for the float path, A8W8 with a BF16 KV cache, A8W8 with
an INT8 KV cache, the same two after SmoothQuant smoothing, and the latter with ``--quantize-lm-head``. The model runs in-process (the worker's ModelRunner),
because perplexity needs logits at every position, which the serving protocol does not carry.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.chat_template import ChatTemplate
from engine.tokenizer import load_tokenizer
from loaders.assets import eval_text_path
from loaders.quantization import Int8Linear, quantize_activations
from loaders.weights import load_model_weights
from npu.messages import NewSequence, SamplingOptions, ScheduledChunk, StepRequest, WorkerConfig
from npu.backends.base import UnfusedLinear
from npu.model import ForwardBatch, SeqSpan
from npu.runner import ModelRunner
from server.smooth_quant import smooth_checkpoint

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in one sentence.", "Write a haiku about the sea.",
    "What is 12 times 12?", "Name three primary colours.", "How do I boil an egg?",
    "Translate 'good morning' into Spanish.", "What is the largest planet in the solar system?",
    "Give me a tip for learning a new language.", "Why is the sky blue?", "What does a bakery sell?",
    "Describe a cat in two sentences.", "What is the boiling point of water at sea level?",
    "Suggest a name for a small bookshop.", "What is the opposite of 'ancient'?", "How many days are in a leap year?",
    "Write one sentence about autumn.", "What is a synonym for 'happy'?", "Who wrote Romeo and Juliet?",
    "List two benefits of walking.",
]
# name -> (quantization, KV dtype, quantize_lm_head, smoothed); "smoothed" runs the SmoothQuant-folded
# copy of the model (server/smooth_quant.py), whose float function is the same.
CONFIGS = {
    "float": ("none", "fp32", False, False),
    "a8w8_bf16kv": ("a8w8", "bf16", False, False),
    "a8w8_int8kv": ("a8w8", "int8", False, False),
    "smoothquant_a8w8_bf16kv": ("a8w8", "bf16", False, True),
    "smoothquant_a8w8_int8kv": ("a8w8", "int8", False, True),
    "smoothquant_a8w8_int8kv_int8head": ("a8w8", "int8", True, True),
}
BLOCK = 16


@dataclass
class QualityResult:
    perplexity: dict[str, float]
    greedy_agreement: dict[str, float]  # fraction of tokens equal to the float path's, per config
    num_tokens: int

    def table(self) -> str:
        base = self.perplexity["float"]
        lines = ["| configuration | perplexity | vs float | greedy agreement with float (20 prompts x 64 tokens) |",
                 "| --- | --- | --- | --- |"]
        for name, ppl in self.perplexity.items():
            lines.append(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} % | "
                         f"{100 * self.greedy_agreement[name]:.1f} % |")
        return "\n".join(lines)


def _runner(model_dir: str, quantization: str, kv: str, max_len: int, quantize_lm_head: bool = False) -> ModelRunner:
    return ModelRunner(WorkerConfig(model_dir=model_dir, quantization=quantization, kv_cache_dtype=kv,
                                    quantize_lm_head=quantize_lm_head, kv_cache_memory_bytes=512 << 20,
                                    block_size=BLOCK, max_model_len=max_len))


def perplexity(runner: ModelRunner, ids: list[int]) -> float:
    n = len(ids)
    slots = torch.arange(n)
    batch = ForwardBatch(torch.tensor(ids), torch.arange(n), slots, [SeqSpan(0, n, slots)], torch.arange(n - 1))
    logits = runner.model.forward(batch, runner.cache)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = -logprobs[torch.arange(n - 1), torch.tensor(ids[1:])].mean().item()
    return math.exp(nll)


def greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    opts = SamplingOptions(temperature=0)
    next_block = 0
    chunks = []
    for i, p in enumerate(prompts):
        need = -(-(len(p) + steps) // BLOCK)
        chunks.append(ScheduledChunk(i, len(p), list(range(next_block, next_block + need)), True))
        next_block += need
    out: list[list[int]] = [[] for _ in prompts]
    res = runner.execute(StepRequest(1, [], [NewSequence(i, p, len(p), 0, opts) for i, p in enumerate(prompts)], chunks))
    for step in range(steps):
        for t in res.tokens:
            out[t.seq_id].append(t.token_id)
        if step + 1 < steps:
            res = runner.execute(StepRequest(2 + step, [], [], [ScheduledChunk(i, 1, [], True) for i in range(len(prompts))]))
    runner.execute(StepRequest(10_000, list(range(len(prompts))), [], []))
    return out


class _WeightOnlyInt8(UnfusedLinear):
    """Diagnosis only: INT8-rounded weights with float activations (isolates weight quantization error)."""

    def __init__(self, lin: Int8Linear):
        self.weight = lin.dequantized()
        self.out_features, self.in_features = self.weight.shape

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class _ActivationOnlyInt8(UnfusedLinear):
    """Diagnosis only: per-token INT8-rounded activations with the float weights."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.float()
        self.out_features, self.in_features = self.weight.shape

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        q, s = quantize_activations(x)
        return (q.float() * s[:, None]) @ self.weight.t()


def diagnose(model_dir: str, ids: list[int]) -> dict[str, float]:
    """Perplexity with only the weights, or only the activations, of every decoder linear INT8-rounded."""
    max_len = len(ids) + BLOCK
    w_only = _runner(model_dir, "a8w8", "fp32", max_len)
    weights = load_model_weights(model_dir, "a8w8")
    for layer, lw in zip(w_only.model.layers, weights.layers):
        lin = lw.linears
        layer.qkv = _WeightOnlyInt8(Int8Linear.concat([lin["self_attn.q_proj"], lin["self_attn.k_proj"],
                                                       lin["self_attn.v_proj"]]))
        layer.o = _WeightOnlyInt8(lin["self_attn.o_proj"])
        layer.gate_up = _WeightOnlyInt8(Int8Linear.concat([lin["mlp.gate_proj"], lin["mlp.up_proj"]]))
        layer.down = _WeightOnlyInt8(lin["mlp.down_proj"])
    a_only = _runner(model_dir, "none", "fp32", max_len)
    for layer in a_only.model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, _ActivationOnlyInt8(getattr(layer, name).weight))
    return {"int8_weights_only": perplexity(w_only, ids), "int8_activations_only": perplexity(a_only, ids)}


def evaluate(model_dir: str | Path, max_tokens: int | None = None, num_prompts: int = len(PROMPTS),
             steps: int = 64) -> QualityResult:
    model_dir = str(model_dir)
    tok = load_tokenizer(model_dir)
    ids = tok.encode(eval_text_path().read_text(encoding="utf-8"))
    if max_tokens:
        ids = ids[:max_tokens]
    template = ChatTemplate.from_model_dir(model_dir)
    prompts = [tok.encode(template.render([{"role": "user", "content": p}]) if template else p)
               for p in PROMPTS[:num_prompts]]
    max_len = max(len(ids), max(len(p) for p in prompts) + steps) + BLOCK
    ppl: dict[str, float] = {}
    outs: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        smoothed = str(smooth_checkpoint(model_dir, Path(tmp) / "smoothed"))
        for name, (quant, kv, int8_head, smooth) in CONFIGS.items():
            model = smoothed if smooth else model_dir
            runner = _runner(model, quant, kv, max_len, int8_head)
            ppl[name] = perplexity(runner, ids)
            outs[name] = greedy(runner, prompts, steps)  # overwrites the cache perplexity used; it is done
    agreement = {}
    for name, seqs in outs.items():
        same = sum(a == b for x, y in zip(seqs, outs["float"]) for a, b in zip(x, y))
        agreement[name] = same / (len(prompts) * steps)
    return QualityResult(ppl, agreement, len(ids))


def main(model_dir: str, out: str | None, max_tokens: int | None, num_prompts: int, steps: int,
         with_diagnosis: bool = False) -> None:
    result = evaluate(model_dir, max_tokens, num_prompts, steps)
    print(f"model: {model_dir}; perplexity over {result.num_tokens} tokens of {eval_text_path().name}")
    print(result.table())
    report = {"model": model_dir, "num_tokens": result.num_tokens, "perplexity": result.perplexity,
              "greedy_agreement": result.greedy_agreement}
    if with_diagnosis:
        tok = load_tokenizer(model_dir)
        ids = tok.encode(eval_text_path().read_text(encoding="utf-8"))[: result.num_tokens]
        diag = diagnose(model_dir, ids)
        base = result.perplexity["float"]
        print("where the A8W8 loss comes from (fp32 KV):")
        for name, ppl in diag.items():
            print(f"  {name}: perplexity {ppl:.3f} ({100 * (ppl / base - 1):+.2f} % vs float)")
        report["diagnosis"] = diag
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
