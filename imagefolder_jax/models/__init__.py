"""Pure Flax linen modules (no I/O): ViT, quantizer, tokenizer, generator, and the networks the
losses and evaluation use (DINOv2, discriminators, LPIPS, Inception)."""
