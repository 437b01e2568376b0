"""`imagefolder-jax serve`: a local page and HTTP API over warm compiled programs (docs/serving.md).

Modules: `engine` (worker thread, bounded queue, request batching, time limits), `programs` (the
per-row sampler and the per-scale decode), `app` (routes, input limits, errors), `params`
(request validation), `images` (upload checks and PNG encoding), `classes` (class names), `cli`
(the verb). Importing this package imports no web framework; `app` needs the `serve` extra.
"""
