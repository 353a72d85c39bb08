"""Test-only runner that replays scripted token ids instead of running a model.

Selected by ``WorkerConfig.replay_token_ids``; used only to test text post-processing (reasoning
splitting) through the whole server, where a random model cannot produce the needed tokens.
"""

from __future__ import annotations

from npu.messages import Ready, SampledToken, StepRequest, StepResult, WorkerConfig

REPLAY_NUM_BLOCKS = 4096
REPLAY_MAX_MODEL_LEN = 4096


class ReplayRunner:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.script = list(config.replay_token_ids or [])
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
                i = self.generated[ch.seq_id]
                token = self.script[min(i, len(self.script) - 1)]
                self.generated[ch.seq_id] = i + 1
                tokens.append(SampledToken(seq_id=ch.seq_id, token_id=token))
        return StepResult(step_id=req.step_id, tokens=tokens, compute_seconds=0.0)
