"""Typed IPC messages between the engine and the worker process.

Encoding: msgspec msgpack over a ``multiprocessing`` pipe. msgspec validates field types on decode (a
malformed message is an error reply, not a crash) and is several times faster and smaller than
pickle for these lists of ints; nothing in a message needs pickle's arbitrary objects.
A step carries only what changed: a sequence's token ids once (``NewSequence``), then per step how
many of its tokens to compute and which blocks were appended to its block table.
"""

from __future__ import annotations

from enum import Enum

import msgspec


class KVCacheDtype(str, Enum):
    """How the paged KV cache stores K and V (``WorkerConfig.kv_cache_dtype`` takes the values)."""

    INT8 = "int8"  # one fp32 scale per (token, kv head)
    BF16 = "bf16"
    FP32 = "fp32"  # reference only: exact parity tests of the float path


class SamplingOptions(msgspec.Struct, frozen=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}
    min_tokens: int = 0
    # Token ids suppressed while fewer than min_tokens were generated (eos + stop_token_ids).
    min_tokens_suppress_ids: list[int] = []
    # None: no logprobs; k >= 0: the chosen token's logprob plus the top k.
    logprobs: int | None = None


class NewSequence(msgspec.Struct, frozen=True):
    seq_id: int
    token_ids: list[int]  # every known token: the prompt, then tokens generated before a preemption
    num_prompt_tokens: int
    num_cached_tokens: int  # leading tokens whose KV is already in the cache (prefix hit)
    sampling: SamplingOptions


class ScheduledChunk(msgspec.Struct, frozen=True):
    seq_id: int
    num_tokens: int  # compute this many of the sequence's tokens, from its computed count on
    new_block_ids: list[int]  # appended to the sequence's block table before computing
    sample: bool  # sample the next token after this chunk (only when it reaches the last known token)
    # Speculative decoding: the worker may draft and verify up to this many tokens after the chunk (the
    # block table already has room for them). It then returns 1 to max_draft + 1 tokens for the sequence.
    max_draft: int = 0
    # Constrained decoding: the tokens the sampled one must be among, one bit per token id (little-endian
    # int32 words: bit i % 32 of word i // 32); ids past the mask are not allowed. None: unconstrained.
    allowed_token_bitmask: bytes | None = None


class StepRequest(msgspec.Struct, tag="step"):
    step_id: int
    finished_seq_ids: list[int]
    new_seqs: list[NewSequence]
    chunks: list[ScheduledChunk]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class SampledToken(msgspec.Struct, frozen=True):
    seq_id: int
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class SequenceFailure(msgspec.Struct, frozen=True):
    """A sequence the worker could not run this step. The worker has forgotten it; the rest of the
    step ran (one bad sequence never costs the others their step)."""

    seq_id: int
    message: str


class SpecDecodeStats(msgspec.Struct):
    """What speculative decoding did in one step (vLLM's spec-decode metrics)."""

    num_drafts: int = 0  # sequences that had a draft verified
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = []  # accepted drafts by their position in the draft


class StepResult(msgspec.Struct, tag="result"):
    step_id: int
    tokens: list[SampledToken]  # in order; a sequence with a verified draft has several
    compute_seconds: float
    failed: list[SequenceFailure] = []
    spec: SpecDecodeStats | None = None


class StepError(msgspec.Struct, tag="error"):
    step_id: int
    message: str


class Ready(msgspec.Struct, tag="ready"):
    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int
    kv_cache_dtype: str
    quantization: str
    backend: str
    weight_bytes: int
    device: str = "cpu"  # the device in words, e.g. "cuda:0 (NVIDIA H100 80GB HBM3, 132 SMs, 79 GiB)"
    backend_note: str | None = None  # e.g. why a faster kernel is not in use
    # The model's max_position_embeddings when max_model_len was lowered to fit the KV cache (no explicit
    # --max-model-len); None when it was not.
    max_model_len_capped_from: int | None = None


class StartupFailed(msgspec.Struct, tag="failed"):
    message: str


ToWorker = StepRequest | Shutdown
FromWorker = StepResult | StepError | Ready | StartupFailed

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)


class SpeculativeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """vLLM's ``--speculative-config`` for the one method implemented, ``ngram`` (prompt lookup)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int
    prompt_lookup_min: int = 1
    # No drafts while this many sequences or more are running (a large batch is compute-bound: verifying
    # drafts costs more than it saves). None: always.
    disable_by_batch_size: int | None = None

    def validate(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative method {self.method!r} is not implemented; only 'ngram' (prompt lookup)")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, "
                f"got {self.num_speculative_tokens}"
            )
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be positive, got {self.disable_by_batch_size}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} and "
                f"{self.prompt_lookup_max}"
            )


# Drafts longer than this cost more compute per step than a lookup hit is likely to repay.
MAX_SPECULATIVE_TOKENS = 16


# WorkerConfig.cpu_kernels: auto (the fastest kernel family this CPU runs), a family by name (npu/backends/cpu/
# vnni.py FAMILIES), or reference (torch._int_mm and eager PyTorch, no C kernels)
CPU_KERNELS = ("auto", "avx512-vnni", "avx-vnni", "avx2", "neon", "neon-plain", "reference")
INT8_KERNEL_ALIASES = {"vnni": "avx512-vnni", "onednn": "reference"}  # the earlier --int8-kernel's names

# Default KV-cache budget when none is given: enough for many concurrent chats on a small model
# without crowding a 16-24 GB machine.
DEFAULT_KV_CACHE_BYTES = 2 * 1024**3


class WorkerConfig(msgspec.Struct, frozen=True):
    """Everything the worker process needs to start (sent once, at spawn)."""

    model_dir: str
    quantization: str = "auto"  # auto | a8w8 | none
    quantize_lm_head: bool = False  # run a float lm_head in A8W8 too (faster decode, coarser logits)
    dtype: str = "auto"  # float parts (embedding, norms, float linears): auto = the checkpoint's, or a dtype name
    kv_cache_dtype: str = "int8"  # int8 | bf16
    kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES
    block_size: int = 16
    device: str = "auto"  # auto | cpu | cuda (auto: cuda where PyTorch sees a GPU and Triton is installed)
    cpu_kernels: str = "auto"  # cpu kernel family: auto | avx512-vnni | avx-vnni | avx2 | neon | neon-plain | reference
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    sampleable_vocab_size: int | None = None  # tokens past this id are padding; None: the whole vocab
    num_threads: int | None = None
    seed: int = 0
    speculative: SpeculativeConfig | None = None
    # Debugging (--replay-token-ids): every completion is these token ids instead of the model's (npu/replay.py).
    replay_token_ids: list[int] | None = None
