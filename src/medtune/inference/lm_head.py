"""The LM head of decoding steps on CPUs, where at real vocabularies it is most of a step.

A decoding step multiplies a few hidden rows (one per sequence in the batch) by the
``[vocabulary, hidden]`` head: 151,680 × 256 floats (155 MB) in the benchmark model, read whole for
every new token. How that product is handed to BLAS decides what else is read on top:

- ``F.linear(x, W)`` is ``x @ W.T``: MKL then packs the transposed weight on every call, a full
  extra pass over it.
- ``(W @ x.T).T`` ("weight first") packs nothing large: faster for one row and for a few.
- For a batch of rows (continuous batching serves several sequences per step), MKL's own
  pre-packed format (``cblas_sgemm_pack``, reached through ``torch.ops.mkl._mkl_linear``) is faster
  again. Its copy of the weight is about 2.5× the weight's size, so it is made lazily, only when a
  step has several rows, and only for heads up to ``PACK_MAX_WEIGHT_BYTES``.

Measured with one thread on these CPUs in the same process, alternating (milliseconds per step,
151,680 × 256; the machine was shared, so read the ratios):

=====  ========  ============  ======
rows   F.linear  weight first  packed
=====  ========  ============  ======
1      32.7      32.9          35.3
8      96.1      66.8          41.8
=====  ========  ============  ======

All three compute the same dot products, summed in different orders: logits agree to float
rounding, not bit for bit (the tests bound the difference and compare greedy answers).
"""

from __future__ import annotations

import threading
import types
from typing import Any

import torch

# Above this many rows (prompt-sized products) the ordinary product amortises its packing.
DECODE_MAX_ROWS = 64
# MKL's packed copy is about 2.5× the weight; above this size the extra memory is not spent
# (a 7B model's 2.2 GB fp32 head would need ~5.5 GB more).
PACK_MAX_WEIGHT_BYTES = 512 * 2**20
# The row count MKL is told to pack for (a hint: any row count is computed correctly).
_PACK_ROWS_HINT = 8


def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's pre-packed sgemm (x86 builds with MKL)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class _Packed:
    """MKL's packed copy of one head's weight, remade when the weight changes in place."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[int, int] | None = None  # (data pointer, in-place version) it was made from
        self.packed: torch.Tensor | None = None
        self.refused = False  # no MKL, or the weight is too large: never try again

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.refused:
            return None
        # An in-place change (an adapter merged into the head, a loaded state dict) bumps the
        # tensor's version; a stale packed copy would silently compute the old head.
        key = (weight.data_ptr(), weight._version)
        with self.lock:
            if self.key != key:
                if not mkl_packing_available() or weight.numel() * weight.element_size() > PACK_MAX_WEIGHT_BYTES:
                    self.refused = True
                    return None
                self.packed = None  # free the stale copy before making the new one
                try:
                    self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT)
                except RuntimeError:  # an MKL that cannot pack on this CPU: the weight-first product is exact too
                    self.refused = True
                    return None
                self.key = key
            return self.packed


def _decoding_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, W, b)``, computed for decoding-sized inputs the way the CPU does it fastest."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (rows == 0 or rows > DECODE_MAX_ROWS or x.dtype != self.weight.dtype
            or torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
        return torch.nn.functional.linear(x, self.weight, self.bias)
    flat = x.reshape(rows, x.shape[-1])
    packed = self._medtune_packed.get(self.weight) if rows > 1 else None
    if packed is not None:
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), packed, self.weight, self.bias, _PACK_ROWS_HINT)
    else:
        out = torch.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        out = out.contiguous()
    return out.reshape(*x.shape[:-1], out.shape[-1])


def use_decoding_lm_head(model: Any) -> bool:
    """Compute a CPU fp32 model's LM head for decoding steps as ``_decoding_linear`` does.

    For models loaded for inference (it replaces the head's ``forward`` on this instance; a
    product that needs a gradient still takes ``F.linear``). Returns whether it applied: a plain
    ``nn.Linear`` head in float32 on the CPU; not a head an adapter wraps, and not on GPUs, whose
    BLAS has no such cost.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if (type(head) is not torch.nn.Linear or head.weight.device.type != "cpu"
            or head.weight.dtype != torch.float32):
        return False
    head._medtune_packed = _Packed()
    head.forward = types.MethodType(_decoding_linear, head)
    return True
