"""After training: inference, generation, evaluation (Spider included), merge and GGUF export."""
