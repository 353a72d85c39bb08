"""A debugging runner that replays given token ids instead of running the model (``--replay-token-ids``).

Every sequence's completion is the script, one token per step, then its last token repeated until a stop
condition ends it. Under a grammar, a scripted token the grammar does not allow is skipped, as a model's next
choice would be: the first allowed token further on in the script is taken instead (else the lowest allowed
id), so a test can script what a model wants to write and see what the grammar lets through. It reproduces a text post-processing bug (reasoning split, tool-call parsing, stop
strings, detokenization) through the whole server with the exact tokens a model produced, and lets the
tests drive that post-processing where a random-weight model cannot produce the tokens it needs.
"""

from __future__ import annotations

from npu.config import WorkerConfig
from npu.messages import Ready, SampledToken, StepRequest, StepResult
from npu.sampler import allowed_tokens

# No weights or KV cache are allocated, so the pool the scheduler accounts for costs nothing: sized for
# plenty of concurrent requests at the default context.
REPLAY_NUM_BLOCKS = 4096
REPLAY_MAX_MODEL_LEN = 4096


class ReplayRunner:
    """The worker's runner for ``WorkerConfig.replay_token_ids``: the same messages as ``ModelRunner``."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.script = list(config.replay_token_ids or [])
        if not self.script:
            raise ValueError("replay_token_ids is empty: give at least one token id")
        vocab = config.sampleable_vocab_size
        beyond = [t for t in self.script if t < 0 or (vocab is not None and t >= vocab)]
        if beyond:
            raise ValueError(f"replay_token_ids: {beyond[:5]} outside the model's vocabulary (0..{vocab}-1)")
        self.generated: dict[int, int] = {}

    def ready_message(self) -> Ready:
        return Ready(
            max_model_len=self.config.max_model_len or REPLAY_MAX_MODEL_LEN,
            num_blocks=REPLAY_NUM_BLOCKS,
            block_size=self.config.block_size,
            vocab_size=self.config.sampleable_vocab_size or 0,
            kv_cache_dtype=self.config.kv_cache_dtype,
            quantization="replay",
            backend="replay",
            weight_bytes=0,
            backend_note=f"replaying {len(self.script)} token ids instead of running the model "
            "(--replay-token-ids): every completion is that script",
        )

    def warmup(self) -> None:
        pass

    def execute(self, req: StepRequest) -> StepResult:
        for s in req.finished_seq_ids:
            self.generated.pop(s, None)
        for ns in req.new_seqs:
            self.generated[ns.seq_id] = len(ns.token_ids) - ns.num_prompt_tokens
        tokens = []
        for ch in req.chunks:
            if ch.sample:
                i = min(self.generated[ch.seq_id], len(self.script) - 1)
                token = self.script[i]
                if ch.allowed_token_bitmask is not None:
                    i, token = self._allowed(i, ch.allowed_token_bitmask)
                self.generated[ch.seq_id] = i + 1
                tokens.append(SampledToken(seq_id=ch.seq_id, token_id=token))
        return StepResult(step_id=req.step_id, tokens=tokens, compute_seconds=0.0)

    def _allowed(self, i: int, bitmask: bytes) -> tuple[int, int]:
        """The script position and token taken at position ``i`` under a grammar's mask."""
        allowed = allowed_tokens([bitmask], self.config.sampleable_vocab_size or len(bitmask) * 8)[0]
        for j in range(i, len(self.script)):
            if allowed[self.script[j]]:
                return j, self.script[j]
        return i, int(allowed.nonzero()[0, 0]) if allowed.any() else self.script[i]
