from django.conf import settings

from .health import healthcheck


class HealthCheckMiddleware:
    """Answers the health check first, before anything looks at the Host header.

    Load balancers probe web servers by address; nginx rewrites Host to the canonical domain,
    but the check must not depend on that (CommonMiddleware would reject an unknown Host with
    400 via request.get_host()). It also keeps the check free of sessions and CSRF.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path_info == settings.HEALTH_CHECK_PATH and request.method in ("GET", "HEAD"):
            return healthcheck(request)
        return self.get_response(request)
