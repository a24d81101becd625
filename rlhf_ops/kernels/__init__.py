"""Fused fp32 CPU kernels (`cpu_fused.c`), built at first use (`cpu`) and wrapped for autograd (`fused`)."""
