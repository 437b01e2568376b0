"""Numerics shared by the models: resampling matrices, attention masks, top-k/top-p filtering."""
