"""kt-models-deepseek: DeepSeek-V2, V2-Lite and V3 (R1) for kt.

Registers the transformers 5 DeepSeek classes (with KTransformers aliases) for rule
matching, the ``deepseek`` model family (GGUF ``deepseek2``: name map, config from GGUF
metadata) and built-in configs of the public checkpoints for offline planning.
"""
