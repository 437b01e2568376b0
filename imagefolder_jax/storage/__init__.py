"""What is written to disk besides training checkpoints.

  bundle.py     inference bundles: model configs (JSON) + variables (orbax), checked on load
  integrity.py  file records and CRCs that tell a complete write from a damaged one; quiet orbax reads
"""
