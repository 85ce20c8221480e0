from django.db import models


class Note(models.Model):
    """A row written on the primary and read back from a replica (see routers.py)."""

    text = models.CharField(max_length=500)
    written_by = models.CharField(max_length=100, help_text="RIGGER_SERVER that wrote the row")
    created_at = models.DateTimeField(auto_now_add=True)

    def as_dict(self):
        return {
            "id": self.pk,
            "text": self.text,
            "written_by": self.written_by,
            "created_at": self.created_at.isoformat(),
        }


class SurveyCounter(models.Model):
    """How many surveys were started / completed; incremented by a Celery task."""

    KINDS = ("start", "complete")

    kind = models.CharField(max_length=20, unique=True, choices=[(k, k) for k in KINDS])
    count = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)


class Heartbeat(models.Model):
    """Inserted every 10 s by Celery beat -> worker."""

    server = models.CharField(max_length=100, help_text="RIGGER_SERVER of the worker")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def as_dict(self):
        return {
            "id": self.pk,
            "server": self.server,
            "created_at": self.created_at.isoformat(),
        }
