"""Test helpers shared by several test modules."""

from __future__ import annotations

import random
import unicodedata

from loaders.writer import RandomModelSpec
from npu.messages import ScheduledChunk, StepRequest
from npu.runner import ModelRunner

BLOCK_SIZE = 4  # small blocks so prompts and decodes cross many block boundaries
# The smallest model at real Qwen3 ratios (GQA 2:1, head_dim != hidden / heads) with a small vocabulary: the
# kernel and parity tests vary its seed and dtype (dataclasses.replace).
TINY_SPEC = RandomModelSpec(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96, vocab_size=512
)
# A function tool the tool-call tests and benchmarks/tool_call_probe.py offer a model.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}


class Driver:
    """Drives a ModelRunner directly (no process) with trivially sequential block allocation."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.step_id, self.next_block = runner, 0, 0
        self.blocks: dict[int, int] = {}
        self.computed: dict[int, int] = {}

    def _blocks_for(self, seq: int, end: int) -> list[int]:
        need = -(-end // BLOCK_SIZE) - self.blocks.get(seq, 0)
        ids = list(range(self.next_block, self.next_block + need))
        self.next_block += need
        self.blocks[seq] = self.blocks.get(seq, 0) + need
        return ids

    def run(self, new=(), chunks=()):
        self.step_id += 1
        real_chunks = []
        for seq, n, sample in chunks:
            end = self.computed.get(seq, 0) + n
            real_chunks.append(ScheduledChunk(seq, n, self._blocks_for(seq, end), sample))
            self.computed[seq] = end
        return self.runner.execute(StepRequest(self.step_id, [], list(new), real_chunks))


FRAGMENTS = [
    "Hello",
    " world",
    "!",
    "日本語のテキスト",
    "中文字符",
    "한국어",
    "😀",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "👍🏽",
    "e\u0301",
    "é",
    "Å",
    "A\u030a",
    "ﬁ",
    "ǅ",
    "\r\n",
    "\n",
    "\n\n\n",
    "   ",
    "\t",
    "\t\t x",
    "  \n  ",
    "def f(x):\n    return x**2\n",
    "if (a && b) { c++; }",
    "12345",
    "3.14159",
    "1,000,000",
    "٣٤٥",
    "½",
    "don't",
    "DON'T",
    "It's",
    "IT'S",
    "we're",
    "We'Ve",
    "I'm",
    "you'll",
    "He'd",
    "'s",
    "'S",
    "'ll",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "<|fim_prefix|>",
    "\ud800",
    "\udfff",
    "a\ud83dz",
    "ſ",
    "K",
    "\u00a0",
    "\u2003",
    "\u3000",
    "\u200b",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x85",
    "naïve café",
    "Straße",
    "İstanbul",
    "ΑΒΓ αβγ",
    "Привет мир",
    "مرحبا",
    "שלום",
    "नमस्ते",
    "ภาษาไทย",
    "https://example.com/a?b=c&d=e",
    "user@example.com",
    "#!/bin/bash",
    "$HOME/.cache",
    "C:\\Windows",
    "...",
    "---",
    "***",
    "___",
    "?!",
    "«quotes»",
    "“smart”",
    "—",
    "…",
    "\\n",
    "0x1F",
    "1e-5",
    "-42",
]


def corpus(n: int = 1200) -> list[str]:
    rng = random.Random(20261126)
    out = list(FRAGMENTS)
    out += [unicodedata.normalize("NFD", f) for f in FRAGMENTS]
    while len(out) < n:
        k = rng.randint(1, 8)
        out.append("".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", "  ", "\n", ""]) for _ in range(k)))
    # random code points from many planes
    for _ in range(100):
        out.append(
            "".join(
                chr(
                    rng.choice(
                        [
                            rng.randint(0x20, 0x7E),
                            rng.randint(0xA0, 0x2FFF),
                            rng.randint(0x3000, 0x9FFF),
                            rng.randint(0x1F300, 0x1FAFF),
                        ]
                    )
                )
                for _ in range(rng.randint(1, 30))
            )
        )
    return out


class DocumentedSchemas:
    """Validates real response bodies against the component schemas of the server's own /openapi.json,
    strictly: an object may carry only the properties its schema documents (pydantic's schemas allow any
    others), so a field the handlers add without documenting it fails as much as a documented one that is
    wrong."""

    def __init__(self, openapi: dict):
        import copy

        self.components = copy.deepcopy(openapi["components"]["schemas"])
        self._close(self.components)

    @classmethod
    def _close(cls, node) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                cls._close(value)
        elif isinstance(node, list):
            for value in node:
                cls._close(value)

    def validate(self, name: str, body) -> None:
        """Raises jsonschema's ValidationError where ``body`` does not match component ``name``."""
        import jsonschema

        assert name in self.components, f"{name} is not among the documented schemas"
        root = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": self.components}}
        jsonschema.Draft202012Validator(root).validate(body)


def fastest_kernel_library():
    """The library of the fastest CPU kernel family this CPU runs (what ``--cpu-kernels auto`` takes), skipping the
    test where none does: kernel tests that hold for every family run on AVX-512 and AVX2-only machines alike."""
    import pytest

    from npu.backends.cpu.vnni import FAMILIES, load_kernel_library

    reasons = []
    for name in FAMILIES:
        lib, why = load_kernel_library(name)
        if lib is not None:
            return lib
        reasons.append(f"{name}: {why}")
    pytest.skip(f"no CPU kernel family runs here ({'; '.join(reasons)})")
