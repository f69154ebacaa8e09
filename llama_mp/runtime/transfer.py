"""Values between the host and the device without making either wait for the other.

A decode step on a GPU is queued: the host returns at once and queues the next step while the device
works. Two things would break that:
- Reading a value of a step on the host (`.tolist()`, `.item()`, `bool()`, `.cpu()`) makes the host
  wait until everything queued so far has run, and the device then idles until the host queues more.
  So the loops (`Engine.generate`'s streaming, the server's batch) start a copy of what they will read
  as the step is queued (`Readback`), queue the next step, and only then read the copy: the wait, if
  any, is for that one copy, while the next step is already queued behind it.
- Copying host values to the device from ordinary (pageable) memory: PyTorch then synchronizes the
  stream, which is the same wait. The slots, positions and prompt ids a step needs go through `upload`
  instead: pinned memory and a copy the device does on its own, in stream order.
On a CPU both are plain copies (there is no queue to wait for).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch


def upload(values: Union[Sequence[int], torch.Tensor], device: torch.device, dtype: torch.dtype = torch.long
           ) -> torch.Tensor:
    """Host values (a list of numbers, or a tensor on the host) as a tensor on `device`, queued without a
    wait. The one way a step's host-side values reach the device (tests/test_host_syncs.py counts others)."""
    device = torch.device(device)
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype, device="cpu")
    if device.type == "cpu":
        return host
    if device.type != "cuda":  # no queue to keep busy (e.g. "meta" in tests): a plain copy
        return host.to(device)
    # pinned: the device copies it on its own; PyTorch keeps the buffer alive until that copy has run
    return host.pin_memory().to(device, non_blocking=True)


class Readback:
    """Copies of `tensors` (None entries stay None) on the host, started at once; `get()` returns them,
    waiting for the copies alone (on a GPU, for an event recorded right after them)."""

    def __init__(self, tensors: Sequence[Optional[torch.Tensor]]):
        self.host: List[Optional[torch.Tensor]] = []
        self.done: Optional[torch.cuda.Event] = None
        stream = None
        for t in tensors:
            if t is None:
                self.host.append(None)
                continue
            gpu = t.device.type == "cuda"
            # pinned memory: a copy the device does on its own (from pageable memory the host would wait)
            out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=gpu)
            self.host.append(out.copy_(t, non_blocking=gpu))
            if gpu and self.done is None:
                self.done, stream = torch.cuda.Event(), torch.cuda.current_stream(t.device)
        if self.done is not None:
            self.done.record(stream)  # on the stream the copies were queued on, after all of them

    def get(self) -> List[Optional[torch.Tensor]]:
        if self.done is not None:
            self.done.synchronize()
        return self.host
