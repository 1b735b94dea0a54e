"""Built-in HTTP endpoint: status page ``/``, ``/healthz`` and ``/metrics`` (Prometheus text).

Rooms: :mod:`.server` (connections, limits, routes), :mod:`.health` (the checks behind
``/healthz``), :mod:`.metrics` (the prometheus_client collector), :mod:`.page` (the HTML page),
:mod:`.cache` (shared renderings) and :mod:`.reports` (which report files are served).  The
database reads are the store's views (:mod:`huntsman.store.views`).
"""

from huntsman.services.http.health import Health
from huntsman.services.http.metrics import quantiles
from huntsman.services.http.server import StatusServer
from huntsman.store.views import QueryTimeout

__all__ = ["Health", "QueryTimeout", "StatusServer", "quantiles"]
