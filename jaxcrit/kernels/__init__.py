"""Hand-written Pallas kernels for Hopper GPUs (the fused MLP and loss) and their shared GEMM."""
