"""Pure Flax linen modules (no I/O): ViT, quantizer, tokenizer, generator, losses' networks."""
