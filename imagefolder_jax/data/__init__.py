"""Input data: grain sources, transforms and the batched loader.

    from imagefolder_jax import data
    source = data.build_source("demo")               # or "folder:/imgs", "tfds:imagenet2012"
    loader = data.make_loader(source, batch_size=32, resolution=256, train=True, seed=0)
    batch = next(iter(loader))   # {'image': (32, 256, 256, 3) float32 in [-1, 1], 'label': (32,) int32}

Modules: `sources` (DemoSource, ImageFolderSource, TfdsSource, build_source),
`transforms` (decode / crop / flip / normalise, SkipCounter), `pipeline`
(make_loader, iterator state helpers), `images` (single-file read, PNG grid).
"""
from imagefolder_jax.data.images import image_grid, load_image_file, save_image_grid, to_uint8
from imagefolder_jax.data.pipeline import get_iterator_state, make_loader, set_iterator_state
from imagefolder_jax.data.sources import (
    DemoSource,
    ImageFolderSource,
    SourceSpec,
    TfdsSource,
    build_source,
)
from imagefolder_jax.data.transforms import SKIPPED_RECORDS, SkipCounter

__all__ = [
    "DemoSource",
    "ImageFolderSource",
    "SKIPPED_RECORDS",
    "SkipCounter",
    "SourceSpec",
    "TfdsSource",
    "build_source",
    "get_iterator_state",
    "image_grid",
    "load_image_file",
    "make_loader",
    "save_image_grid",
    "set_iterator_state",
    "to_uint8",
]
