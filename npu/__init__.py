"""The worker process: model forward, backend kernels, paged KV cache, sampling, and its client."""
