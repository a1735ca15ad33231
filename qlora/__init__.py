"""qlora: QLoRA fine-tuning building blocks; the loop itself lives in train.py."""
