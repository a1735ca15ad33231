"""Several GPUs: FSDP2 pieces (8-bit AdamW on shards, the fused node on gathered 4-bit weights)."""
