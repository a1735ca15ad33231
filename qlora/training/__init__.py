"""Training: loss, optimizer, checkpoints (sharded ones too), packing, telemetry, curves, determinism."""
