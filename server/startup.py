"""What the server says once it is ready: one summary block (what was loaded, how, where to talk to it) and
a warning for each choice that costs the user something (a slow fallback kernel, a shortened context)."""

from __future__ import annotations

import os

from engine.client import EngineClient

MIB = 1024**2


def startup_warnings(engine: EngineClient) -> list[str]:
    """One line per thing an operator should act on or at least know."""
    info = engine.worker_info
    out = []
    if info is None:
        return out
    if info.backend_note:
        out.append(info.backend_note)
    if info.max_model_len_capped_from is not None:
        worker = engine.config.worker
        out.append(
            f"max_model_len lowered from the model's {info.max_model_len_capped_from} to {info.max_model_len} "
            f"tokens: that is what the KV cache budget of {worker.kv_cache_memory_bytes // MIB} MiB holds "
            f"({info.num_blocks} blocks of {info.block_size}); raise --kv-cache-memory for longer contexts, or "
            "give --max-model-len to choose the length (then a budget too small for it is an error)"
        )
    return out


def startup_summary(
    engine: EngineClient,
    served_model_names: list[str],
    base_url: str | None,
    seconds: float,
    version: str,
    web_ui: bool = False,
) -> str:
    """The block logged when the server starts serving."""
    info = engine.worker_info
    cfg = engine.model_config
    worker = engine.config.worker
    threads = worker.num_threads or os.cpu_count()
    kv_tokens = info.num_blocks * info.block_size
    where = f" on {base_url}" if base_url else ""
    lines = [
        f"a8w8-serve {version} ready{where} after {seconds:.1f} s",
        f"  model          {served_model_names[0]}  ({worker.model_dir})",
        f"  architecture   {cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}",
        f"  quantization   {info.quantization}, linears {info.weight_bytes / MIB:.0f} MiB, "
        f"float parts {worker.dtype if worker.dtype != 'auto' else cfg.torch_dtype}"
        f"{', lm_head in INT8' if worker.quantize_lm_head else ''}",
        f"  device         {info.device}",
        f"  kernels        {info.backend}" + (f", {threads} threads" if info.device == "cpu" else ""),
        f"  KV cache       {info.kv_cache_dtype}, {info.num_blocks} blocks x {info.block_size} tokens = "
        f"{kv_tokens} tokens ({worker.kv_cache_memory_bytes / MIB:.0f} MiB)",
        f"  max_model_len  {engine.max_model_len}",
        f"  defaults       {engine.generation_defaults.describe()}",
    ]
    if base_url:
        lines.append(
            f"  try            curl {base_url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{served_model_names[0]}", "messages": [{{"role": "user", '
            '"content": "Hello!"}]}\''
        )
        if web_ui:
            lines.append(f"  chat page      {base_url}/")
        lines.append(f"  API docs       {base_url}/docs")
    return "\n".join(lines)
