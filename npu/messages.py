"""Typed IPC messages between the engine and the worker process.

Encoding: msgspec msgpack over a ``multiprocessing`` pipe. msgspec validates field types on decode (a
malformed message is an error reply, not a crash) and is several times faster and smaller than
pickle for these lists of ints; nothing in a message needs pickle's arbitrary objects.
A step carries only what changed: a sequence's token ids once (``NewSequence``), then per step how
many of its tokens to compute and which blocks were appended to its block table.
"""

from __future__ import annotations

import msgspec


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
