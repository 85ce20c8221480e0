"""Settings of the surveys example site.

Every setting comes from the environment that rigger renders for each server (see
docs/app-contract.md in the rigger repository). A missing required variable stops the import
with an error that names it. Only when RIGGER_ALLOW_DEFAULTS=1 is set (for `manage.py check`
or `makemigrations` on a developer machine) are harmless placeholders used instead.
"""
import os
import ssl
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

ALLOW_DEFAULTS = os.environ.get("RIGGER_ALLOW_DEFAULTS") == "1"

# Placeholders used only with RIGGER_ALLOW_DEFAULTS=1; never in a deployed environment.
_FALLBACKS = {
    "RIGGER_PROJECT": "surveys",
    "RIGGER_ENVIRONMENT": "dev",
    "RIGGER_ROLE": "web",
    "RIGGER_SERVER": "dev-1",
    "RIGGER_RELEASE": "dev",
    "DJANGO_SECRET_KEY": "insecure-placeholder-only-for-manage-py-check-and-makemigrations",
    "DJANGO_ALLOWED_HOSTS": "localhost,127.0.0.1",
    "DATABASE_HOST": "127.0.0.1",
    "DATABASE_PORT": "6432",
    "DATABASE_USER": "surveys",
    "DATABASE_PASSWORD": "",
    "DATABASE_NAME": "surveys",
    "REDIS_URL": "redis://127.0.0.1:6379",
    "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
    "RIGGER_CA_CERT": "",
    "MEDIA_ROOT": str(BASE_DIR / ".dev-media"),
    "STATIC_ROOT": str(BASE_DIR / ".dev-static"),
}

_missing = [
    name for name in _FALLBACKS if name not in os.environ and not ALLOW_DEFAULTS
]
if _missing:
    raise ImproperlyConfigured(
        "surveys: missing required environment variable(s): "
        + ", ".join(_missing)
        + " (rigger provides them in app.env, see docs/app-contract.md; "
        "set RIGGER_ALLOW_DEFAULTS=1 only for `manage.py check` or `makemigrations`)"
    )


def env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        value = _FALLBACKS[name]
    return value


def env_list(name: str, default: str = "") -> list[str]:
    raw = os.environ.get(name, _FALLBACKS.get(name, default))
    return [item.strip() for item in raw.split(",") if item.strip()]


# --- identity of this server (shown by the health check, pages and tasks) --------------------
RIGGER_PROJECT = env("RIGGER_PROJECT")
RIGGER_ENVIRONMENT = env("RIGGER_ENVIRONMENT")
RIGGER_ROLE = env("RIGGER_ROLE")
RIGGER_SERVER = env("RIGGER_SERVER")
RIGGER_RELEASE = env("RIGGER_RELEASE")

HEALTH_CHECK_PATH = "/healthcheck.html"

# --- core ------------------------------------------------------------------------------------
SECRET_KEY = env("DJANGO_SECRET_KEY")
DEBUG = False
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS")
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("surveys: DJANGO_ALLOWED_HOSTS is empty")
CSRF_TRUSTED_ORIGINS = [
    "https://*" + host if host.startswith(".") else "https://" + host
    for host in ALLOWED_HOSTS
    if host != "*"
]

INSTALLED_APPS = [
    "django.contrib.staticfiles",
    "polls",
]

MIDDLEWARE = [
    # First: answers /healthcheck.html before anything validates the Host header.
    "polls.middleware.HealthCheckMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "surveys.urls"
WSGI_APPLICATION = "surveys.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
            ],
        },
    },
]

# --- TLS ends at the load balancer / nginx -----------------------------------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# nginx redirects plain HTTP to HTTPS (and sends HSTS when rigger.toml sets hsts_max_age);
# gunicorn is never reached over plain HTTP from outside, and the load balancers probe the
# health check by address.
SECURE_SSL_REDIRECT = False

# --- databases: the primary and each replica through this server's PgBouncer -------------------
def _database(name: str) -> dict:
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "HOST": env("DATABASE_HOST"),
        "PORT": env("DATABASE_PORT"),
        "USER": env("DATABASE_USER"),
        "PASSWORD": env("DATABASE_PASSWORD"),
        # PgBouncer pools in transaction mode: no server-side cursors, no prepared statements,
        # and no long-lived connections (PgBouncer itself keeps the server connections).
        "CONN_MAX_AGE": 0,
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "OPTIONS": {
            "prepare_threshold": None,
            "connect_timeout": 5,
            "application_name": f"{env('RIGGER_PROJECT')}@{env('RIGGER_SERVER')}"[:63],
        },
    }


DATABASES = {"default": _database(env("DATABASE_NAME"))}

# DATABASE_REPLICA_NAMES may be empty: then every read goes to the primary.
REPLICA_DATABASES = []
for _index, _name in enumerate(env_list("DATABASE_REPLICA_NAMES"), start=1):
    _alias = f"replica{_index}"
    DATABASES[_alias] = _database(_name)
    DATABASES[_alias]["TEST"] = {"MIRROR": "default"}
    REPLICA_DATABASES.append(_alias)

DATABASE_ROUTERS = ["polls.routers.PrimaryReplicaRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- TLS to Redis and RabbitMQ: rigger serves both over TLS only (rediss://, amqps://), with
# certificates of the environment's CA for the servers' addresses. Check them against that CA,
# names included; never against the system's CAs, never without checking.
RIGGER_CA_CERT = env("RIGGER_CA_CERT")

# --- Redis: db 0 cache, db 1 sessions, db 2 Celery results ------------------------------------
REDIS_URL = env("REDIS_URL").rstrip("/")
_REDIS_TLS = {"ssl_cert_reqs": "required", "ssl_ca_certs": RIGGER_CA_CERT}
_REDIS_OPTIONS = {
    "socket_connect_timeout": 2,
    "socket_timeout": 2,
    **(_REDIS_TLS if REDIS_URL.startswith("rediss://") else {}),
}

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": f"{REDIS_URL}/0",
        "KEY_PREFIX": RIGGER_PROJECT,
        "OPTIONS": _REDIS_OPTIONS,
    },
    "sessions": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": f"{REDIS_URL}/1",
        "KEY_PREFIX": RIGGER_PROJECT,
        "OPTIONS": _REDIS_OPTIONS,
    },
}
SESSION_ENGINE = "django.contrib.sessions.backends.cache"
SESSION_CACHE_ALIAS = "sessions"

# --- Celery: RabbitMQ broker, Redis results ---------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL")
if CELERY_BROKER_URL.startswith("amqps://"):
    # server_hostname None: py-amqp checks the certificate's name against the URL's host
    # (without it, only the chain is checked).
    CELERY_BROKER_USE_SSL = {
        "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": RIGGER_CA_CERT,
        "server_hostname": None,
    }
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_RESULT_BACKEND = f"{REDIS_URL}/2"
if REDIS_URL.startswith("rediss://"):
    CELERY_REDIS_BACKEND_USE_SSL = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": RIGGER_CA_CERT,
    }
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_TRACK_STARTED = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
# The beat schedule is kept in memory: the only entry runs every 10 s, so nothing is lost by
# a restart, and beat needs no writable schedule file in the (read-only) release directory.
CELERY_BEAT_SCHEDULER = "celery.beat:Scheduler"
CELERY_BEAT_SCHEDULE = {
    "record-heartbeat": {
        "task": "polls.tasks.record_heartbeat",
        "schedule": 10.0,
    },
}

# --- files -------------------------------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = env("STATIC_ROOT")
MEDIA_URL = "/media/"
MEDIA_ROOT = env("MEDIA_ROOT")

# --- i18n --------------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# --- logging: everything to stderr at INFO (gunicorn/celery/systemd collect it) --------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "format": f"%(asctime)s %(levelname)s {RIGGER_SERVER} %(name)s: %(message)s",
        },
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            "formatter": "plain",
        },
    },
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {
        "django": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
