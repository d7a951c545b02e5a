"""Side services ``make serve`` starts beside the apps (scripts/serve_all.py reads this)."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from patterns.business_logic.settings import BusinessSettings


def side_services() -> list[list[str]]:
    """The outside risk-signal API the fraud check calls, on the loopback port that
    ``BUSINESS_RISK_SERVICE_URL`` names (8701 by default), so two clusters on one machine
    can each have their own. A URL on another host is a real API: nothing is started."""
    url = urlsplit(BusinessSettings().risk_service_url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        return []
    port = url.port or (443 if url.scheme == "https" else 80)
    return [
        [
            sys.executable,
            "-m",
            "patterns.business_logic.risk_service",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    ]
