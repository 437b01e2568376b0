"""Training: one loop (`loop`, `trainer`), the two tasks (`tokenizer_task`, `generator_task`),
losses, optimizers, configs and resumable checkpoints (`checkpointing`)."""
