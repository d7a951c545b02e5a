"""Business-logic pattern: a fraud check that reads a database, a feature store and an outside
risk service before a batched model scores it and business rules decide.

Public entry points: ``PUBLIC`` below names the modules (and ``bench/``) that code outside
this folder may import; the README's "Public entry points" lists the same, and
tests/test_shape.py holds reliability/, loadtests/, scripts/ and cluster/ to it. The other
modules are the pattern's inside and may change without notice.
"""

PUBLIC = (
    "app",
    "flow",
    "client",
    "artifacts",
    "seed",
    "audit",
    "risk_service",
    "services",
    "bench",
)
