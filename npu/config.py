"""The worker's configuration: everything the worker process needs to start (sent once, at spawn, through the
typed IPC of npu/messages.py), with the closed sets its fields take as enums."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from loaders.options import Quantization


class Device(StrEnum):
    """``WorkerConfig.device``: ``auto`` is cuda where PyTorch sees a GPU and Triton is installed, else cpu."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class KVCacheDtype(StrEnum):
    """How the paged KV cache stores K and V (``WorkerConfig.kv_cache_dtype`` takes the values)."""

    INT8 = "int8"  # one fp32 scale per (token, kv head)
    BF16 = "bf16"
    FP32 = "fp32"  # reference only: exact parity tests of the float path


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
class CpuKernels(StrEnum):
    """``WorkerConfig.cpu_kernels``: a CPU kernel family by name, ``auto`` or ``reference``."""

    AUTO = "auto"
    AVX512_VNNI = "avx512-vnni"
    AVX_VNNI = "avx-vnni"
    AVX2 = "avx2"
    NEON = "neon"
    NEON_PLAIN = "neon-plain"
    REFERENCE = "reference"


CPU_KERNELS = tuple(k.value for k in CpuKernels)
INT8_KERNEL_ALIASES = {"vnni": "avx512-vnni", "onednn": "reference"}  # the earlier --int8-kernel's names

# Default KV-cache budget when none is given: enough for many concurrent chats on a small model
# without crowding a 16-24 GB machine.
DEFAULT_KV_CACHE_BYTES = 2 * 1024**3


class WorkerConfig(msgspec.Struct, frozen=True):
    """Everything the worker process needs to start (sent once, at spawn)."""

    model_dir: str
    quantization: Quantization = Quantization.AUTO
    quantize_lm_head: bool = False  # run a float lm_head in A8W8 too (faster decode, coarser logits)
    dtype: str = "auto"  # float parts (embedding, norms, float linears): auto = the checkpoint's, or a dtype name
    kv_cache_dtype: KVCacheDtype = KVCacheDtype.INT8
    kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES
    block_size: int = 16
    device: Device = Device.AUTO
    cpu_kernels: CpuKernels = CpuKernels.AUTO
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    sampleable_vocab_size: int | None = None  # tokens past this id are padding; None: the whole vocab
    num_threads: int | None = None
    seed: int = 0
    speculative: SpeculativeConfig | None = None
    # Debugging (--replay-token-ids): every completion is these token ids instead of the model's (npu/replay.py).
    replay_token_ids: list[int] | None = None
