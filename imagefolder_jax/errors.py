"""The library's one base error.

Every error the library raises for bad input (arguments, configs, files, bundles, checkpoints,
topologies, a job started with inconsistent flags) is an `ImageFolderError` whose message names the
offending value in one line; the CLI prints it and exits 2. It subclasses ValueError, so callers
that catch ValueError keep working. A peer process that took another path is a
`parallel.BarrierError` instead (a RuntimeError: exit 3).
"""


class ImageFolderError(ValueError):
  """Bad input; the message is one line naming the problem."""
