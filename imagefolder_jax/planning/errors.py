"""The planning error (its own module so that every planning module can raise it)."""

from imagefolder_jax.errors import ImageFolderError


class PlanError(ImageFolderError):
  """A plan request is invalid or cannot be compiled here (the message names the value or the fix)."""
