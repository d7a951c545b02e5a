"""Voting ensemble across model families, with deadlines, a quorum, dynamic selection and a
shadow challenger. See README.md.

Public entry points: ``PUBLIC`` below names the modules (and ``bench/``) that code outside
this folder may import; the README's "Public entry points" lists the same, and
tests/test_shape.py holds reliability/, loadtests/, scripts/ and cluster/ to it. The other
modules are the pattern's inside and may change without notice.
"""

PUBLIC = ("app", "flow", "client", "grpc_client", "artifacts", "bench")
