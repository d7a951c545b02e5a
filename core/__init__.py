"""Shared serving layer for the cookbook, built on Ray Serve.

Only what every pattern really shares lives here: settings, resource profiles, the model
store, ingress helpers, resilience helpers and metrics. Importing this package does no work.
"""
