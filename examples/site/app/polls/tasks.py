import csv
import logging
import os
from datetime import datetime, timezone

from celery import shared_task
from django.conf import settings
from django.db.models import F
from django.utils import timezone as dj_timezone

from .models import Heartbeat, Note, SurveyCounter

logger = logging.getLogger(__name__)


@shared_task
def count_survey_event(kind):
    """Atomically increments the counter of `kind` ("start" or "complete") on the primary."""
    if kind not in SurveyCounter.KINDS:
        raise ValueError(f"unknown survey event kind {kind!r}")
    counters = SurveyCounter.objects.using("default")
    counters.get_or_create(kind=kind)
    counters.filter(kind=kind).update(count=F("count") + 1, updated_at=dj_timezone.now())
    count = counters.get(kind=kind).count
    logger.info("survey event %s counted on %s: now %d", kind, settings.RIGGER_SERVER, count)
    return {"kind": kind, "count": count, "server": settings.RIGGER_SERVER}


@shared_task
def export_csv():
    """Writes the counters to MEDIA_ROOT/exports/<timestamp>.csv and returns the file's path."""
    directory = os.path.join(settings.MEDIA_ROOT, "exports")
    os.makedirs(directory, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = os.path.join(directory, f"{stamp}.csv")
    rows = SurveyCounter.objects.using("default").order_by("kind")
    tmp = path + ".part"
    with open(tmp, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["kind", "count", "updated_at"])
        for row in rows:
            writer.writerow([row.kind, row.count, row.updated_at.isoformat()])
    os.replace(tmp, path)  # readers never see a half-written export
    logger.info("exported counters to %s", path)
    return path


@shared_task
def record_heartbeat():
    """Run by Celery beat every 10 s: proves beat -> RabbitMQ -> worker -> primary works."""
    beat = Heartbeat.objects.create(server=settings.RIGGER_SERVER)
    return beat.as_dict()


@shared_task
def write_note(text):
    """Writes a Note on the primary from the worker; the test then reads it on a replica."""
    note = Note.objects.create(text=text, written_by=settings.RIGGER_SERVER)
    return note.as_dict()


@shared_task
def slow_note(text, seconds):
    """Sleeps, then writes a Note: a long task that must survive a deploy (the old worker's
    warm shutdown lets it finish)."""
    import time

    time.sleep(min(float(seconds), 120.0))
    note = Note.objects.create(text=text, written_by=settings.RIGGER_SERVER)
    return note.as_dict()
