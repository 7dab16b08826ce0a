"""Training: one optimizer step, memory-augmented adaptation (DDP / FSDP / LoRA) and backbone pretraining."""
