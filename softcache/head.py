"""A CPU teacher's output layer computed into one buffer that the teacher job keeps.

``model(...).logits`` allocates the [B, L, V] logits afresh at every batch. On a CPU the kernel then
maps and zero-fills every page of that allocation as the output layer first writes it: 400 MB for
4 x 512 positions of a 49,152-id vocabulary, every batch. A teacher job runs thousands of
batches of one shape, so :class:`KeptHead` takes the hidden states where they enter the output
layer, lets the layer return nothing, and writes the layer's matrix product into a buffer kept
from batch to batch, with the same kernel and therefore the same bits.

It is used only where that product is the model's whole last step: a CPU teacher whose output
embedding is a plain ``nn.Linear`` (no accelerate hooks), and whose logits on a short probe equal
the kept head's bit for bit. A model that scales, caps or slices its logits after the layer fails
the probe and runs its own forward unchanged.
"""

from __future__ import annotations

import contextlib

import torch


class KeptHead:
    """Use as ``with head.capturing(): model(...); logits = head.logits(batch, length)``."""

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer
        self.hidden: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, device: torch.device) -> KeptHead | None:
        """The kept head of ``model``, or None where the model's own forward must run (see the module)."""
        layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if (device.type != "cpu" or type(layer) is not torch.nn.Linear or hasattr(layer, "_hf_hook")
                or layer.weight.device.type != "cpu"):
            return None
        head = cls(layer)
        probe = torch.arange(8, device=device)[None] % layer.out_features
        try:
            with torch.inference_mode():
                own = model(input_ids=probe, use_cache=False).logits
                with head.capturing():
                    model(input_ids=probe, use_cache=False)
                kept = head.logits(1, probe.shape[1])
        except Exception:  # noqa: BLE001 -- any model that does not fit runs its own forward
            return None
        return head if own.shape == kept.shape and own.dtype == kept.dtype and torch.equal(own, kept) else None

    @contextlib.contextmanager
    def capturing(self):
        """While inside, the output layer keeps its input and returns an empty tensor."""
        def capture(hidden: torch.Tensor) -> torch.Tensor:
            self.hidden = hidden
            return hidden.new_empty(*hidden.shape[:-1], 0)

        before = self.layer.__dict__.get("forward")
        self.layer.forward = capture
        try:
            yield self
        finally:
            if before is None:
                del self.layer.forward  # the class's forward again
            else:
                self.layer.forward = before

    def logits(self, batch: int, length: int) -> torch.Tensor:
        """[batch, length, V] logits of the hidden states captured last, in the kept buffer (valid until
        the next call)."""
        hidden, self.hidden = self.hidden, None
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight, bias = self.layer.weight, self.layer.bias
        rows = hidden.shape[0]
        if self.buffer is None or self.buffer.shape[0] < rows or self.buffer.dtype != weight.dtype:
            self.buffer = None  # free the old one first
            self.buffer = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
        out = self.buffer[:rows]
        if bias is None:
            torch.mm(hidden, weight.t(), out=out)
        else:
            torch.addmm(bias, hidden, weight.t(), out=out)
        return out.view(batch, length, -1)
