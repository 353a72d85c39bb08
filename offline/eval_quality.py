"""``a8w8-serve eval-quality``: what A8W8 and the INT8 KV cache cost in quality on a real model.

Measured the way llama.cpp's ``llama-perplexity --kl-divergence`` does, on a fixed committed text
(``loaders/assets/eval/prose.txt``, self-written prose) in chunks of 512 tokens with the second half of each
scored: perplexity, the mean and 99th percentile of the KL divergence of each configuration's next-token
distribution from the float model's, and the share of positions where both pick the same top token. The
free-running greedy agreement (64 tokens for 20 fixed prompts; after the first differing token everything
counts as different) is reported beside them. Configurations: the float path, A8W8 with a BF16 or INT8 KV
cache, the same after SmoothQuant smoothing, and the latter with ``--quantize-lm-head``. The model runs
in-process (the worker's ModelRunner), because the metrics need logits at every position, which the
serving protocol does not carry.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.chat_template import ChatTemplate
from engine.tokenizer import load_tokenizer
from loaders.assets import eval_text_path
from loaders.quantization import quantize_activations, quantize_symmetric
from loaders.weights import load_model_weights
from loaders.writer import quantize_checkpoint
from npu.backends.base import UnfusedLinear
from npu.config import WorkerConfig
from npu.messages import NewSequence, SamplingOptions, ScheduledChunk, StepRequest
from npu.model import ForwardBatch, SeqSpan
from npu.runner import ModelRunner
from offline.gptq import gptq_rounding
from offline.quantize import QuantizeRecipe, quantize_with_recipe
from offline.smooth_quant import DEFAULT_ALPHA, smooth_checkpoint

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Name three primary colours.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is the largest planet in the solar system?",
    "Give me a tip for learning a new language.",
    "Why is the sky blue?",
    "What does a bakery sell?",
    "Describe a cat in two sentences.",
    "What is the boiling point of water at sea level?",
    "Suggest a name for a small bookshop.",
    "What is the opposite of 'ancient'?",
    "How many days are in a leap year?",
    "Write one sentence about autumn.",
    "What is a synonym for 'happy'?",
    "Who wrote Romeo and Juliet?",
    "List two benefits of walking.",
]

# compressed-tensors ignore pattern of every layer's down_proj
FLOAT_DOWN_PROJ = "re:.*mlp.down_proj"


@dataclass(frozen=True)
class EvalConfig:
    quantization: str  # none | a8w8
    kv: str  # KV cache dtype
    int8_head: bool = False  # --quantize-lm-head
    smoothed: bool = False  # the SmoothQuant-folded copy (offline/smooth_quant.py): the same float function
    keep_float: tuple[str, ...] = ()  # linears the quantized checkpoint keeps in float (its ignore list)
    dtype: str = "auto"  # --dtype of the float parts (embedding, norms, lm_head)
    rotation: str | None = None  # offline/rotate.py's R1 kind (with R2 and the online R4), after any smoothing
    gptq: bool = False  # INT8 weights rounded by GPTQ (offline/gptq.py), not to nearest
    r3: bool = False  # with a rotation: R3 too, queries and keys rotated per head after RoPE (online)

    @property
    def source(self) -> tuple[bool, str | None, bool]:
        """Which float checkpoint the row runs (quantized on load): smoothed or not, rotated how, with R3 or not."""
        return self.smoothed, self.rotation, self.r3

    @property
    def written(self) -> bool:
        """Whether the row's INT8 checkpoint is written first (GPTQ rounding, linears kept in float), rather than
        quantized on load from a float checkpoint."""
        return self.gptq or bool(self.keep_float)

    @property
    def recipe(self) -> QuantizeRecipe:
        """The ``a8w8-serve quantize`` recipe of the row's weights, for rows whose checkpoint is written first."""
        from offline.rotate import RotationPlan

        return QuantizeRecipe(
            smooth_alpha=DEFAULT_ALPHA if self.smoothed else None,
            rotation=RotationPlan(r1=self.rotation, r3=self.r3) if self.rotation else None,
            gptq=self.gptq,
        )


# The first is the reference the others are scored against.
CONFIGS = {
    "float": EvalConfig("none", "fp32"),
    "a8w8_bf16kv": EvalConfig("a8w8", "bf16"),
    "a8w8_int8kv": EvalConfig("a8w8", "int8"),
    "smoothquant_a8w8_bf16kv": EvalConfig("a8w8", "bf16", smoothed=True),
    "smoothquant_a8w8_int8kv": EvalConfig("a8w8", "int8", smoothed=True),
    "smoothquant_a8w8_int8kv_int8head": EvalConfig("a8w8", "int8", True, smoothed=True),
    "smoothquant_a8w8_int8kv_bf16": EvalConfig("a8w8", "int8", smoothed=True, dtype="bfloat16"),
    # down_proj (whose input, silu(gate) * up, per-token INT8 serves worst after smoothing) kept in float
    "smoothquant_a8w8_int8kv_float_down": EvalConfig("a8w8", "int8", smoothed=True, keep_float=(FLOAT_DOWN_PROJ,)),
    # Hadamard rotations (offline/rotate.py): R1 on the residual stream as one Kronecker Hadamard matrix or as
    # blocks of the largest power of two, R2 per head on v/o, R4 online on down_proj's input
    "rotated_a8w8_bf16kv": EvalConfig("a8w8", "bf16", rotation="kron"),
    "rotated_a8w8_int8kv": EvalConfig("a8w8", "int8", rotation="kron"),
    "rotated_blocks_a8w8_int8kv": EvalConfig("a8w8", "int8", rotation="blocks"),
    "smoothquant_rotated_a8w8_int8kv": EvalConfig("a8w8", "int8", smoothed=True, rotation="kron"),
    "rotated_a8w8_int8kv_bf16": EvalConfig("a8w8", "int8", rotation="kron", dtype="bfloat16"),
    "rotated_a8w8_int8kv_bf16_int8head": EvalConfig("a8w8", "int8", True, rotation="kron", dtype="bfloat16"),
    # GPTQ rounding of the INT8 weights (the larger share of what rotation leaves)
    "gptq_a8w8_int8kv": EvalConfig("a8w8", "int8", gptq=True),
    "rotated_gptq_a8w8_int8kv": EvalConfig("a8w8", "int8", rotation="kron", gptq=True),
    "smoothquant_rotated_gptq_a8w8_int8kv": EvalConfig("a8w8", "int8", smoothed=True, rotation="kron", gptq=True),
    "rotated_gptq_a8w8_int8kv_bf16": EvalConfig("a8w8", "int8", rotation="kron", gptq=True, dtype="bfloat16"),
    "rotated_gptq_a8w8_int8kv_bf16_int8head": EvalConfig(
        "a8w8", "int8", True, rotation="kron", gptq=True, dtype="bfloat16"
    ),
    # R3 (the online rotation of queries and keys per head): the INT8 KV cache's share
    "rotated_gptq_a8w8_int8kv_r3": EvalConfig("a8w8", "int8", rotation="kron", gptq=True, r3=True),
    "rotated_gptq_a8w8_int8kv_bf16_r3": EvalConfig(
        "a8w8", "int8", rotation="kron", gptq=True, dtype="bfloat16", r3=True
    ),
}
# The row that is the built-in default model's recipe (offline/default_model.py; a test holds them together).
DEFAULT_ROW = "rotated_gptq_a8w8_int8kv_bf16_r3"
BLOCK = 16
# llama.cpp's llama-perplexity protocol (-c 512, as in its --kl-divergence mode): the text in chunks of this many
# tokens, each evaluated with a fresh context, and only the second half of each chunk scored (every scored
# token has at least half a chunk of context).
KLD_CONTEXT = 512
P99 = 0.99


@dataclass
class Scores:
    """One configuration against the float model over the scored positions (llama-perplexity's figures)."""

    perplexity: float
    mean_kld: float  # mean KL(float || this) of the next-token distributions
    p99_kld: float
    same_top: float  # share of positions whose most likely token is the float model's
    positions: int
    # standard error of ln(perplexity / the float model's) over the positions (llama-perplexity prints it as
    # "Mean ln(PPL(Q)/PPL(base))" +- this): how far a perplexity difference is from noise at this text length
    ln_ppl_ratio_stderr: float = 0.0


@dataclass
class QualityResult:
    scores: dict[str, Scores]
    greedy_agreement: dict[str, float]  # fraction of tokens equal to the float path's, per config
    num_tokens: int
    context: int

    @property
    def perplexity(self) -> dict[str, float]:
        return {name: s.perplexity for name, s in self.scores.items()}

    def table(self) -> str:
        base = self.scores["float"].perplexity
        lines = [
            "| configuration | perplexity | vs float (+- 1 s.e.) | mean KLD | p99 KLD | same top token "
            "| greedy agreement (free-running) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, sc in self.scores.items():
            lines.append(
                f"| {name} | {sc.perplexity:.3f} | {100 * (sc.perplexity / base - 1):+.2f} % "
                f"+- {100 * sc.ln_ppl_ratio_stderr:.2f} % | "
                f"{sc.mean_kld:.4f} | {sc.p99_kld:.4f} | {100 * sc.same_top:.1f} % | "
                f"{100 * self.greedy_agreement[name]:.1f} % |"
            )
        return "\n".join(lines)


def _runner(
    model_dir: str, quantization: str, kv: str, max_len: int, quantize_lm_head: bool = False, dtype: str = "auto"
) -> ModelRunner:
    return ModelRunner(
        WorkerConfig(
            model_dir=model_dir,
            quantization=quantization,
            kv_cache_dtype=kv,
            quantize_lm_head=quantize_lm_head,
            kv_cache_memory_bytes=512 << 20,
            block_size=BLOCK,
            max_model_len=max_len,
            dtype=dtype,
        )
    )


def perplexity(runner: ModelRunner, ids: list[int]) -> float:
    """Perplexity of one pass over all of ``ids`` (every position scored)."""
    n = len(ids)
    slots = torch.arange(n)
    batch = ForwardBatch(torch.tensor(ids), torch.arange(n), slots, [SeqSpan(0, n, slots)], torch.arange(n - 1))
    logits = runner.model.forward(batch, runner.cache)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = -logprobs[torch.arange(n - 1), torch.tensor(ids[1:])].mean().item()
    return math.exp(nll)


def scored_logprobs(
    runner: ModelRunner, ids: list[int], context: int = KLD_CONTEXT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities ``[P, vocab]`` at the scored positions of every whole chunk of ``context``
    tokens (positions context/2 .. context-2 of each chunk, each chunk a fresh sequence), and the tokens
    that follow them ``[P]``."""
    first = context // 2
    rows = torch.arange(first, context - 1)
    logprobs, targets = [], []
    for start in range(0, len(ids) - context + 1, context):
        chunk = ids[start : start + context]
        slots = torch.arange(context)
        batch = ForwardBatch(torch.tensor(chunk), torch.arange(context), slots, [SeqSpan(0, context, slots)], rows)
        logprobs.append(torch.log_softmax(runner.model.forward(batch, runner.cache).float(), dim=-1))
        targets.append(torch.tensor(chunk[first + 1 :]))
    if not logprobs:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {context}")
    return torch.cat(logprobs), torch.cat(targets)


def score(base: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> Scores:
    """llama-perplexity --kl-divergence's figures for ``logprobs`` against the float model's ``base``."""
    positions = torch.arange(len(targets))
    kld = (base.exp() * (base - logprobs)).sum(-1)
    # per position, ln p_float(token) - ln p_this(token): its mean is ln(perplexity / the float model's)
    nll_gap = (base[positions, targets] - logprobs[positions, targets]).double()
    return Scores(
        perplexity=math.exp(-logprobs[positions, targets].mean().item()),
        mean_kld=kld.mean().item(),
        p99_kld=torch.quantile(kld, P99).item(),
        same_top=(base.argmax(-1) == logprobs.argmax(-1)).float().mean().item(),
        positions=len(targets),
        ln_ppl_ratio_stderr=(nll_gap.std() / math.sqrt(len(targets))).item() if len(targets) > 1 else 0.0,
    )


def greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    opts = SamplingOptions(temperature=0)
    next_block = 0
    chunks = []
    for i, p in enumerate(prompts):
        need = -(-(len(p) + steps) // BLOCK)
        chunks.append(ScheduledChunk(i, len(p), list(range(next_block, next_block + need)), True))
        next_block += need
    out: list[list[int]] = [[] for _ in prompts]
    res = runner.execute(
        StepRequest(1, [], [NewSequence(i, p, len(p), 0, opts) for i, p in enumerate(prompts)], chunks)
    )
    for step in range(steps):
        for t in res.tokens:
            out[t.seq_id].append(t.token_id)
        if step + 1 < steps:
            res = runner.execute(
                StepRequest(2 + step, [], [], [ScheduledChunk(i, 1, [], True) for i in range(len(prompts))])
            )
    runner.execute(StepRequest(10_000, list(range(len(prompts))), [], []))
    return out


# Activation group size of the simulated per-group variant: llama.cpp's Q8_0 / Q8_1 blocks.
ACTIVATION_GROUP = 32


class _SimulatedLinear(UnfusedLinear):
    """Diagnosis only, eager fp32: ``weight`` (float, or INT8-rounded by the caller) applied to activations
    that are float (``group`` None), INT8 per token (0) or INT8 per ``group`` consecutive channels; after the
    op's own online rotation (``input_hadamard``, a rotated model's down_proj)."""

    def __init__(self, weight: torch.Tensor, group: int | None, input_hadamard: int = 0):
        self.weight, self.group = weight.float(), group
        self.out_features, self.in_features = self.weight.shape
        self.input_hadamard = input_hadamard

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.group == 0:
            q, s = quantize_activations(x)
            x = q.float() * s[:, None]
        elif self.group is not None:
            m, k = x.shape
            q, s = quantize_symmetric(x.view(m, k // self.group, self.group), dim=-1)
            x = (q.float() * s).view(m, k)
        return x @ self.weight.t()


LINEAR_KINDS = ("qkv", "o", "gate_up", "down")


def _linear_weights(model_dir: str, quantization: str) -> list[dict[str, torch.Tensor]]:
    """Per layer, the (dequantized) weight of each fused linear the model runs: qkv, o, gate_up, down."""
    out = []
    for lw in load_model_weights(model_dir, quantization, dtype="float32").layers:
        w = {name: lin.dequantized() for name, lin in lw.linears.items()}
        out.append(
            {
                "qkv": torch.cat([w["self_attn.q_proj"], w["self_attn.k_proj"], w["self_attn.v_proj"]]),
                "o": w["self_attn.o_proj"],
                "gate_up": torch.cat([w["mlp.gate_proj"], w["mlp.up_proj"]]),
                "down": w["mlp.down_proj"],
            }
        )
    return out


def _replace_linears(runner: ModelRunner, weights: list[dict[str, torch.Tensor]], group, kinds=LINEAR_KINDS):
    runner.model.decode_stack = None
    for layer, w in zip(runner.model.layers, weights):
        for kind in kinds:
            setattr(layer, kind, _SimulatedLinear(w[kind], group, getattr(layer, kind).input_hadamard))
    return runner


def _simulated(model_dir: str, max_len: int, quantization: str, group: int | None) -> ModelRunner:
    return _replace_linears(
        _runner(model_dir, "none", "fp32", max_len), _linear_weights(model_dir, quantization), group
    )


def diagnose(model_dir: str, ids: list[int], context: int = KLD_CONTEXT) -> dict[str, Scores]:
    """Where the default recipe's loss comes from, on its rotated float model (fp32 float parts, fp32 KV unless
    named): INT8-rounded weights alone (to nearest, and GPTQ's), per-token INT8 activations alone, INT8
    activations per group of 32 channels with INT8 weights (llama.cpp's Q8 granularity on the activation side),
    the INT8 KV cache alone without and with R3; then the A8W8 GPTQ model without and with R3, and (with R3)
    with each kind of linear kept in float in turn and with its lm_head's weights rounded to bfloat16 (fp32
    activations)."""
    from offline.rotate import RotationPlan, rotate_checkpoint

    max_len = context + BLOCK
    base, targets = scored_logprobs(_runner(model_dir, "none", "fp32", max_len), ids, context)
    with tempfile.TemporaryDirectory() as tmp:
        kind = CONFIGS[DEFAULT_ROW].rotation or "kron"
        rotated = str(rotate_checkpoint(model_dir, Path(tmp) / "rotated", RotationPlan(r1=kind)))
        rotated_r3 = str(rotate_checkpoint(model_dir, Path(tmp) / "rotated-r3", RotationPlan(r1=kind, r3=True)))
        gptq, gptq_r3 = str(Path(tmp) / "gptq"), str(Path(tmp) / "gptq-r3")
        # the default model's weights (GPTQ under the R3 checkpoint's Hessians, as its recipe computes them), with
        # R3 in the config and without it: the rows without R3 differ by R3 alone
        rounding = gptq_rounding(Path(rotated_r3))
        quantize_checkpoint(rotated, gptq, rounding=rounding)
        quantize_checkpoint(rotated_r3, gptq_r3, rounding=rounding)
        runners = {
            "rotated_int8_weights_only": lambda: _simulated(rotated, max_len, "a8w8", None),
            "rotated_gptq_int8_weights_only": lambda: _simulated(gptq, max_len, "auto", None),
            "rotated_int8_activations_only": lambda: _simulated(rotated, max_len, "none", 0),
            f"rotated_a8w8_activations_per_{ACTIVATION_GROUP}": lambda: _simulated(
                rotated, max_len, "a8w8", ACTIVATION_GROUP
            ),
            "rotated_int8_kv_only": lambda: _runner(rotated, "none", "int8", max_len),
            "rotated_int8_kv_only_r3": lambda: _runner(rotated_r3, "none", "int8", max_len),
            "rotated_gptq_a8w8_fp32kv": lambda: _runner(gptq, "auto", "fp32", max_len),
            "rotated_gptq_a8w8_int8kv": lambda: _runner(gptq, "auto", "int8", max_len),
            "rotated_gptq_a8w8_int8kv_r3": lambda: _runner(gptq_r3, "auto", "int8", max_len),
            "rotated_gptq_a8w8_int8kv_r3_bf16_head_weights": lambda: _bf16_head(
                _runner(gptq_r3, "auto", "int8", max_len)
            ),
        }
        floats = _linear_weights(rotated, "none")
        for linear in LINEAR_KINDS:
            runners[f"rotated_gptq_a8w8_int8kv_r3_{linear}_float"] = lambda linear=linear: _replace_linears(
                _runner(gptq_r3, "auto", "int8", max_len), floats, None, (linear,)
            )
        out = {}
        for name, make in tqdm(runners.items(), desc="diagnosis", unit="row", disable=None):
            out[name] = score(base, *scored_logprobs(make(), ids, context))
    return out


def _bf16_head(runner: ModelRunner) -> ModelRunner:
    """The runner with its (float) lm_head's weight rounded to bfloat16, the rest as it is."""
    from loaders.quantization import FloatLinear

    head = runner.model.lm_head
    weight = head.weight if hasattr(head, "weight") else None
    if weight is None:
        raise ValueError("the lm_head is not a float linear here")
    runner.model.lm_head = runner.model.backend.prepare_linear(FloatLinear(weight.to(torch.bfloat16).float()))
    return runner


def float_sources(model_dir: str | Path, tmp: Path, wanted: set[tuple[bool, str | None, bool]]) -> dict:
    """The float checkpoints the rows run, by :attr:`EvalConfig.source`: the model itself, its SmoothQuant-folded
    copy, and rotated copies of either (rotation after smoothing: smoothing's factors fold into the norms,
    which the rotation folds into the linears), with R3 or without (the same weights, another config)."""
    from offline.rotate import RotationPlan, rotate_checkpoint

    out: dict[tuple[bool, str | None, bool], Path] = {(False, None, False): Path(model_dir)}
    if any(smoothed for smoothed, _, _ in wanted):
        out[(True, None, False)] = smooth_checkpoint(model_dir, tmp / "smoothed")
    for smoothed, rotation, r3 in sorted(wanted, key=str):
        if rotation is not None:
            dst = tmp / f"{'smoothed-' if smoothed else ''}rotated-{rotation}{'-r3' if r3 else ''}"
            plan = RotationPlan(r1=rotation, r3=r3)
            out[(smoothed, rotation, r3)] = rotate_checkpoint(out[(smoothed, None, False)], dst, plan)
    return out


def select_rows(rows: list[str] | None) -> dict[str, EvalConfig]:
    """The configurations to run: ``rows`` (and ``float``, the reference, first), or all of them."""
    if not rows:
        return dict(CONFIGS)
    unknown = [r for r in rows if r not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    return {name: c for name, c in CONFIGS.items() if name == "float" or name in rows}


def evaluate(
    model_dir: str | Path,
    max_tokens: int | None = None,
    num_prompts: int = len(PROMPTS),
    steps: int = 64,
    context: int = KLD_CONTEXT,
    rows: list[str] | None = None,
) -> QualityResult:
    model_dir = str(model_dir)
    configs = select_rows(rows)
    tok = load_tokenizer(model_dir)
    ids = tok.encode(eval_text_path().read_text(encoding="utf-8"))
    if max_tokens:
        ids = ids[:max_tokens]
    template = ChatTemplate.from_model_dir(model_dir)
    prompts = [
        tok.encode(template.render([{"role": "user", "content": p}]) if template else p) for p in PROMPTS[:num_prompts]
    ]
    max_len = max(context, max(len(p) for p in prompts) + steps) + BLOCK
    scores: dict[str, Scores] = {}
    outs: dict[str, list[list[int]]] = {}
    base = targets = None
    with tempfile.TemporaryDirectory() as tmp:
        sources = float_sources(model_dir, Path(tmp), {c.source for c in configs.values() if not c.written})
        # checkpoints written first, by (recipe, linears kept in float): rows that differ only in how they run
        # (KV dtype, float dtype, --quantize-lm-head) share one
        written: dict[tuple[QuantizeRecipe, tuple[str, ...]], Path] = {}
        # (a run takes minutes: progress over the configurations, on a terminal)
        for name, c in tqdm(configs.items(), desc="eval-quality configurations", unit="config", disable=None):
            if c.written:
                # through `a8w8-serve quantize`'s own pipeline, so that the default row's INT8 weights are the
                # default model's bit for bit (its float parts written in fp32, cast on load by the row's dtype).
                # GPTQ's Hessians come from the checkpoint as the recipe leaves it: R3 changes its config, not its
                # weights, but runs in the calibration pass, and GPTQ turns those rounding differences into other
                # roundings (perplexity +0.62 % against +0.29 %, 2026-12-06)
                key = (c.recipe, c.keep_float)
                if key not in written:
                    written[key] = quantize_with_recipe(
                        model_dir, Path(tmp) / f"{name}-w8a8", c.recipe, ignore=c.keep_float
                    )
                source = written[key]
            else:
                source = sources[c.source]
            runner = _runner(str(source), c.quantization, c.kv, max_len, c.int8_head, c.dtype)
            logprobs, targets = scored_logprobs(runner, ids, context)
            base = logprobs if base is None else base  # "float" comes first
            scores[name] = score(base, logprobs, targets)
            outs[name] = greedy(runner, prompts, steps)  # overwrites the cache the chunks used; they are done
    agreement = {}
    for name, seqs in outs.items():
        same = sum(a == b for x, y in zip(seqs, outs["float"]) for a, b in zip(x, y))
        agreement[name] = same / (len(prompts) * steps)
    return QualityResult(scores, agreement, len(ids), context)


def main(
    model_dir: str,
    out: str | None,
    max_tokens: int | None,
    num_prompts: int,
    steps: int,
    with_diagnosis: bool = False,
    context: int = KLD_CONTEXT,
    rows: list[str] | None = None,
) -> None:
    result = evaluate(model_dir, max_tokens, num_prompts, steps, context, rows)
    scored = next(iter(result.scores.values())).positions
    print(
        f"model: {model_dir}; {result.num_tokens} tokens of {eval_text_path().name} in chunks of {context}, "
        f"the second half of each scored ({scored} positions), as llama-perplexity -c {context} --kl-divergence; "
        f"greedy agreement over {num_prompts} prompts x {steps} tokens"
    )
    print(result.table())
    report = {
        "model": model_dir,
        "num_tokens": result.num_tokens,
        "context": context,
        # the row that is the built-in default model's recipe (when it ran)
        "default": DEFAULT_ROW if DEFAULT_ROW in result.scores else None,
        "scores": {k: asdict(v) for k, v in result.scores.items()},
        "greedy_agreement": result.greedy_agreement,
    }
    if with_diagnosis:
        tok = load_tokenizer(model_dir)
        ids = tok.encode(eval_text_path().read_text(encoding="utf-8"))[: result.num_tokens]
        diag = diagnose(model_dir, ids, context)
        base = result.scores["float"].perplexity
        print(f"where the default recipe's loss comes from ({DEFAULT_ROW}'s parts, float parts in fp32):")
        for name, sc in diag.items():
            print(
                f"  {name}: perplexity {sc.perplexity:.3f} ({100 * (sc.perplexity / base - 1):+.2f} % "
                f"+- {100 * sc.ln_ppl_ratio_stderr:.2f} %), "
                f"mean KLD {sc.mean_kld:.4f}, p99 KLD {sc.p99_kld:.4f}, same top {100 * sc.same_top:.1f} %"
            )
        report["diagnosis"] = {k: asdict(v) for k, v in diag.items()}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
