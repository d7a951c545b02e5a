"""Shared serving layer for the cookbook, built on Ray Serve: only what every pattern shares
(settings, resources, the model store, ingress, resilience, batching, metrics). Importing this
package does no work.
"""
