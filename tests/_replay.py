"""A stand-in for a Triton kernel that runs it and records ``(kernel, grid, args, kwargs)``, so that the launch
sequence of one call can be replayed later with the same arguments, as a captured CUDA graph replays its kernel
nodes."""

from __future__ import annotations

import torch


class ReplayLog:
    def __init__(self, real, log: list):
        self.real, self.log = real, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.real, grid, args, kwargs))
            return self.real[grid](*args, **kwargs)

        return launch


def warm_up(call) -> None:
    """Run ``call`` twice on a side stream before a CUDA-graph capture (compiles the kernels, allocates the buffers),
    as torch.cuda.graph's documentation asks."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
