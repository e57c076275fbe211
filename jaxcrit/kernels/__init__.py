"""The hot spots' fused implementations and the one choice between them and XLA's (selection.py):
cuDNN's flash attention, the hand-written Pallas kernels for the MLP and the loss, their shared
Hopper GEMM."""
