"""Default artifacts for the business-logic pattern (``make setup`` runs this).

    python -m patterns.business_logic.artifacts [--force]

- the fraud model, trained on synthetic transactions: ``business-fraud-gbm/v1`` in the core
  model store (skops, a safe format; holdout AUC in its manifest);
- the records database and the feature store, seeded deterministically (``seed.py``): the
  embedded SQLite files under artifacts/business_logic/, or whatever BUSINESS_DATABASE_URL and
  BUSINESS_FEATURE_STORE_URL point to.
"""

from __future__ import annotations

import argparse
import time

from core.model_store import ModelStore
from patterns.business_logic.model import MODEL_NAME, MODEL_VERSION, train
from patterns.business_logic.seed import seed_database, seed_feature_store
from patterns.business_logic.settings import BusinessSettings


def _log(msg: str) -> None:
    print(f"[business_logic] {msg}", flush=True)


def ensure_model(store: ModelStore, *, force: bool = False) -> None:
    if store.exists(MODEL_NAME, MODEL_VERSION) and not force:
        _log(f"model {MODEL_NAME}/{MODEL_VERSION} present")
        return
    t0 = time.perf_counter()
    _log(f"training {MODEL_NAME}/{MODEL_VERSION} on synthetic transactions")
    clf, meta = train()
    store.save_sklearn(MODEL_NAME, MODEL_VERSION, clf, meta, overwrite=force)
    _log(f"trained in {time.perf_counter() - t0:.1f}s; holdout AUC {meta['holdout_auc']}")


def ensure_artifacts(store: ModelStore | None = None, *, force: bool = False) -> None:
    store = store or ModelStore.from_settings()
    ensure_model(store, force=force)
    settings = BusinessSettings()
    seed_database(settings.database_url, force=force)
    seed_feature_store(settings.feature_store_url, settings.database_url, force=force)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the business-logic pattern's artifacts.")
    parser.add_argument("--force", action="store_true")
    ensure_artifacts(force=parser.parse_args().force)


if __name__ == "__main__":
    main()
