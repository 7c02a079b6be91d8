"""Benchmark scripts for lora_kernels (run one with ``python benchmarks/<script>.py --help``)."""
