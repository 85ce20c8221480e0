"""Celery application: broker is RabbitMQ (CELERY_BROKER_URL), results live in Redis db 2.

Run with `celery -A surveys worker` and `celery -A surveys beat`; all configuration comes from
the CELERY_* names in surveys.settings.
"""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "surveys.settings")

app = Celery("surveys")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
