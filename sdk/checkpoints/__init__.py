"""Training state, committed and restored: save with a manifest created last, verify, load with fallback, prune,
several ranks, stale attempts fenced, the asynchronous snapshot and save.

:mod:`sdk.checkpoints.checkpointer` is the entry point (:class:`Checkpointer`); the rest is its parts. Modules that
need torch import it themselves: listing and verifying checkpoints (the CLI) stay torch-free.
"""
