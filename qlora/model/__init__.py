"""The model: the base (loading, 4-bit quantisation, layer-by-layer build) and LoRA on top of it."""
