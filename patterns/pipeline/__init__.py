"""Vision pipeline: the same stages fused in one replica or split into deployments. See
README.md.

Public entry points: ``PUBLIC`` below names the modules (and ``bench/``) that code outside
this folder may import; the README's "Public entry points" lists the same, and
tests/test_shape.py holds reliability/, loadtests/, scripts/ and cluster/ to it. The other
modules are the pattern's inside and may change without notice.
"""

PUBLIC = ("app", "flow", "stages", "client", "artifacts", "bench")
