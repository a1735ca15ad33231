"""Speed paths: packed-attention backends, the fused NF4+LoRA node, seeded dropout, FP8 GEMMs, liger kernels,
CUDA graphs, activation offload, and the table of switches."""
