"""kt-models-qwen: Qwen2-MoE and Qwen3-MoE for kt.

Registers the transformers 5 Qwen MoE classes (with KTransformers aliases) for rule
matching, the ``qwen-moe`` model family (GGUF ``qwen2moe``/``qwen3moe``) and built-in
configs of the public checkpoints for offline planning.
"""
