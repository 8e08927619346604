"""GGML block formats: dequantization (GGUF → torch) and quantization (torch → GGUF blocks).

Each GGML type stores a tensor as fixed-size blocks of bytes; `dequantize` turns those
bytes back into floats with vectorized torch code, `quantize` does the reverse for the
types `kt convert` writes. gguf-py's numpy implementation is the independent reference
both are tested against.
"""
