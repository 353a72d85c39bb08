"""Files shipped with the package: the official Qwen3 tokenizer (Apache-2.0, see qwen3-tokenizer/README.md)."""

from pathlib import Path


def qwen3_tokenizer_dir() -> Path:
    """Directory holding the Qwen3 tokenizer.json, vocab.json, merges.txt, tokenizer_config.json."""
    return Path(__file__).parent / "qwen3-tokenizer"


def eval_text_path() -> Path:
    """Self-written English prose (about 2,000 tokens) used for perplexity measurements."""
    return Path(__file__).parent / "eval" / "prose.txt"


def calibration_text_path() -> Path:
    """Self-written mixed text (prose, a letter, code, Q&A) used to calibrate activation smoothing.
    Disjoint from :func:`eval_text_path`, so calibration never sees the evaluation text."""
    return Path(__file__).parent / "eval" / "calibration.txt"
