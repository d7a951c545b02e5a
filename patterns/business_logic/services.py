"""Side services ``make serve`` starts beside the apps (scripts/serve_all.py reads this)."""

from __future__ import annotations

import sys

from patterns.business_logic.settings import RISK_SERVICE_PORT


def side_services() -> list[list[str]]:
    # The outside risk-signal API the fraud check calls (BUSINESS_RISK_SERVICE_URL).
    return [
        [
            sys.executable,
            "-m",
            "patterns.business_logic.risk_service",
            "--host",
            "127.0.0.1",
            "--port",
            str(RISK_SERVICE_PORT),
        ]
    ]
