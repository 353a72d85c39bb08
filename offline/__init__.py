"""What runs without the server: provisioning the built-in default model, SmoothQuant smoothing before
quantization, and the quality evaluation. These run the model in-process (the worker's ModelRunner), so they sit
beside ``server/`` and use ``engine/``, ``npu/`` and ``loaders/``; the CLI imports them when asked to."""
