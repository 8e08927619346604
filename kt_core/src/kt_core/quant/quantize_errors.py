"""The ways `quantize` refuses a tensor.

Each is a `ValueError`, so a caller such as `kt convert` can catch it and pick another
type or report the tensor, and also a `KtUserError`: all three are about the input (the
model's tensors, the requested type), so an uncaught one reaches the user as a plain
message rather than a traceback.
"""

from __future__ import annotations

from kt_core.errors import KtUserError


class QuantizationShapeError(KtUserError, ValueError):
    """The tensor's last dimension is not a whole number of the type's blocks.

    GGML blocks never straddle rows, so such a tensor cannot be stored in that type at
    all; the caller has to pick another type for it (see `can_quantize`).
    """


class UnsupportedQuantizationTypeError(KtUserError, ValueError):
    """The requested GGML type is not one kt can write (see `QUANTIZABLE_TYPES`)."""


class NonFiniteTensorError(KtUserError, ValueError):
    """The tensor holds NaN or infinite values, which no block-quantized type can store.

    A block's scale is derived from its extreme values, so a single NaN or inf would turn
    the whole block into garbage without any visible error; we refuse instead. Float
    types (F32, F16, BF16) store such values as they are and never raise this.
    """
