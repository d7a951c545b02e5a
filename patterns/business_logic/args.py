"""The pattern's typed args and the ``Scorer`` they build, without Ray.

app.py wires these into Serve deployments; the load study's monolith and microservices arms
(bench/arms.py) build the same scorer from the same args under plain uvicorn, so a process
there does not import Ray for the sake of a pydantic model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from core.resources import StageResources
from patterns.business_logic.features import FeaturePolicy, open_feature_store
from patterns.business_logic.flow import Scorer
from patterns.business_logic.model import MODEL_VERSION
from patterns.business_logic.records import RecordStore
from patterns.business_logic.risk_client import RiskServiceClient
from patterns.business_logic.rules import DecisionRules
from patterns.business_logic.settings import BusinessSettings

# A payment is a few hundred bytes; anything near this is not one (413 before it is read).
MAX_BODY_BYTES = 16_384


class RiskCallArgs(BaseModel):
    timeout_s: float = Field(default=0.3, gt=0, le=10)  # one call to the outside service
    attempts: int = Field(default=2, ge=1, le=5)  # retries only on connect errors and 5xx
    retry_ratio: float = Field(default=0.2, ge=0, le=1)  # retries <= 20% of recent calls
    breaker_failures: int = Field(default=5, ge=1)  # consecutive failures that open it
    breaker_reset_s: float = Field(default=10.0, gt=0)  # open this long, then one trial call


class BusinessArgs(BaseModel):
    # None: read BUSINESS_DATABASE_URL / BUSINESS_FEATURE_STORE_URL / BUSINESS_RISK_SERVICE_URL
    # in each replica (so passwords in DSNs stay in the environment, not in the config).
    database_url: str | None = None
    feature_store_url: str | None = None
    risk_service_url: str | None = None
    db_timeout_s: float = Field(default=2.0, gt=0, le=30)
    db_pool_size: int = Field(default=4, ge=1, le=64)
    feature_store_timeout_s: float = Field(default=0.25, gt=0, le=10)
    feature_policy: FeaturePolicy = FeaturePolicy()
    risk: RiskCallArgs = RiskCallArgs()
    rules: DecisionRules = DecisionRules()
    model_version: str = MODEL_VERSION
    model_timeout_s: float = Field(default=2.0, gt=0)
    model_store_uri: str | None = None  # default: COOKBOOK_MODEL_STORE_URI
    log_decisions: bool = True  # write every decision to the audit table
    ingress_resources: StageResources = StageResources(num_cpus=0.1)
    model_resources: StageResources = StageResources(num_cpus=0.1)


def build_scorer(args: BusinessArgs, model_call: Any) -> Scorer:
    """The scorer with its dependencies opened from args, falling back to the environment."""
    settings = BusinessSettings()
    risk = args.risk
    return Scorer(
        records=RecordStore(
            args.database_url or settings.database_url,
            timeout_s=args.db_timeout_s,
            pool_size=args.db_pool_size,
        ),
        features=open_feature_store(
            args.feature_store_url or settings.feature_store_url,
            timeout_s=args.feature_store_timeout_s,
        ),
        risk=RiskServiceClient(
            args.risk_service_url or settings.risk_service_url,
            timeout_s=risk.timeout_s,
            attempts=risk.attempts,
            retry_ratio=risk.retry_ratio,
            breaker_failures=risk.breaker_failures,
            breaker_reset_s=risk.breaker_reset_s,
        ),
        model_call=model_call,
        rules=args.rules,
        policy=args.feature_policy,
        model_timeout_s=args.model_timeout_s,
        log_decisions=args.log_decisions,
    )
