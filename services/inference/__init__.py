"""Inference node: model engines (llama.cpp, TensorRT-LLM, emulated), provider policy,
signed receipts over ``swarmserve.native.TokenStreamHasher``, and ``Score`` (issue #3)."""
