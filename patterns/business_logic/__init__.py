"""Business-logic pattern: a fraud check that reads a database, a feature store and an outside
risk service before a batched model scores it and business rules decide."""
