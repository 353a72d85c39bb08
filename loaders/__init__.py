"""Checkpoints: configs, safetensors reading, compressed-tensors W8A8, quantize-on-load, writers."""
