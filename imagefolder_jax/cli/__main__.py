"""`python -m imagefolder_jax.cli VERB ...` (what the tests' subprocesses run)."""
import sys

from imagefolder_jax.cli import main

sys.exit(main())
