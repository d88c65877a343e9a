"""Metrics and logging: the lowest layer, importable from everywhere."""
