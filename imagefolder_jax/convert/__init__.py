"""Converters: official PyTorch checkpoints into bundles (`official`, `official_generator`), bundles
back into the official layout (`export_official`, `export_official_files`), and the weights of the
frozen networks (`dinov2`, `discriminator`, `lpips`, `inception`)."""
