"""Cluster plumbing: how a local Ray cluster is started, and Serve's HAProxy as its edge.

Patterns do not import this package; ``make serve``, the tests, the benchmarks, the load
study and the chaos suite do.
"""
