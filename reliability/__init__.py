"""Reliability suite: load while faults happen, counted by outcome (``make chaos``)."""
