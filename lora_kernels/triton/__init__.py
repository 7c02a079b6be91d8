"""Triton kernels, one module per op (``lora_linear``, ...).

Nothing is imported here: each op module imports ``triton`` and defines its ``@triton.jit`` kernels when the op first
dispatches to it, so importing ``lora_kernels`` costs no Triton import and ``TRITON_INTERPRET`` can still be set before
any kernel is defined.
"""
