"""Device-specific kernels: the only place that knows CPUs and GPUs.

cpu.py (16-bit matmuls on a CPU), gpu.py (cuDNN's packed attention), host_memory.py (the host
allocator). The model names a backend (`model.attention_impl`, `model.matmul_impl`); these
modules implement them.
"""
