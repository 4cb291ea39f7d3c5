"""Trained readers of the thoughts: probes, lenses, subspaces."""
