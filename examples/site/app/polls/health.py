"""The health check: 200 only when the database (through PgBouncer) and the cache both work."""
import logging
import secrets

from django.conf import settings
from django.core.cache import caches
from django.db import connections
from django.http import HttpResponse

logger = logging.getLogger(__name__)


def _text(status: int, body: str) -> HttpResponse:
    response = HttpResponse(body, status=status, content_type="text/plain; charset=utf-8")
    response["Cache-Control"] = "no-store"
    return response


def healthcheck(request):
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
            if cursor.fetchone() != (1,):
                raise RuntimeError("SELECT 1 returned something else")
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        logger.warning("health check: database failed: %r", exc)
        return _text(503, f"database unavailable: {type(exc).__name__}")

    try:
        cache = caches["default"]
        # A key per check: concurrent checks on one server must not overwrite each other.
        token = secrets.token_hex(8)
        key = f"healthcheck:{settings.RIGGER_SERVER}:{token}"
        cache.set(key, token, timeout=60)
        if cache.get(key) != token:
            raise RuntimeError("value read back differs")
        cache.delete(key)
    except Exception as exc:  # noqa: BLE001
        logger.warning("health check: cache failed: %r", exc)
        return _text(503, f"cache unavailable: {type(exc).__name__}")

    return _text(200, f"OK {settings.RIGGER_SERVER} {settings.RIGGER_RELEASE}")
