"""Views of the surveys example site.

The human page (`/`) is a normal CSRF-protected form. The JSON endpoints are API-style test
endpoints used by rigger's end-to-end tests, so they are csrf_exempt.
"""
import json
import logging

from celery.result import AsyncResult
from django.conf import settings
from django.db import router
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import tasks
from .models import Heartbeat, Note, SurveyCounter

logger = logging.getLogger(__name__)

MAX_TASK_WAIT_SECONDS = 20.0


def _identity():
    return {"server": settings.RIGGER_SERVER, "release": settings.RIGGER_RELEASE}


def _json(data, status=200):
    response = JsonResponse(data, status=status)
    response["Cache-Control"] = "no-store"
    return response


def _error(status, message):
    return _json({"error": message, **_identity()}, status=status)


def _count_visit(request):
    visits = request.session.get("visits", 0) + 1
    request.session["visits"] = visits
    return visits


def _request_text(request, default=None):
    """`text` from a JSON body ({"text": ...}) or from a form field."""
    if request.content_type == "application/json":
        try:
            payload = json.loads(request.body or b"{}")
        except ValueError:
            return None
        text = payload.get("text", default) if isinstance(payload, dict) else None
    else:
        text = request.POST.get("text", default)
    if not isinstance(text, str) or not text.strip():
        return None
    return text.strip()[: Note._meta.get_field("text").max_length]


# --- the human page ------------------------------------------------------------------------


@never_cache
@require_http_methods(["GET", "HEAD", "POST"])
def index(request):
    """Server id, release and a visit counter kept in the (Redis) session.

    POST (CSRF-protected form) enqueues a survey event and redirects back.
    """
    if request.method == "POST":
        kind = request.POST.get("kind", "")
        if kind not in SurveyCounter.KINDS:
            return render(request, "polls/index.html", {"error": "unknown survey event"}, status=400)
        result = tasks.count_survey_event.delay(kind)
        request.session["last_task"] = {"id": result.id, "kind": kind}
        return redirect("index")

    visits = _count_visit(request)
    counters = {c.kind: c.count for c in SurveyCounter.objects.using("default").all()}
    context = {
        **_identity(),
        "role": settings.RIGGER_ROLE,
        "environment": settings.RIGGER_ENVIRONMENT,
        "visits": visits,
        "counters": [(kind, counters.get(kind, 0)) for kind in SurveyCounter.KINDS],
        "last_task": request.session.pop("last_task", None),
    }
    return render(request, "polls/index.html", context)


# --- sessions across web servers -------------------------------------------------------------


@never_cache
@require_GET
def session_json(request):
    """{"server": ..., "visits": n}; n grows by one per request carrying the same cookie."""
    return _json({"server": settings.RIGGER_SERVER, "visits": _count_visit(request)})


# --- primary writes, replica reads ---------------------------------------------------------


@csrf_exempt
@require_POST
def create_note(request):
    """POST /notes with {"text": ...} (JSON or form): writes a Note on the primary."""
    text = _request_text(request)
    if text is None:
        return _error(400, 'expected a non-empty "text" (JSON body or form field)')
    note = Note.objects.create(text=text, written_by=settings.RIGGER_SERVER)
    return _json({**note.as_dict(), "database": note._state.db, "server": settings.RIGGER_SERVER}, 201)


@never_cache
@require_GET
def get_note(request, note_id):
    """GET /notes/<id>?from=replica|primary|<alias>: reads the note from that database.

    `replica` (the default) lets the router pick a replica (the primary when there is none).
    Always 200: `found` says whether the row is there yet, so a test can poll for it.
    """
    source = request.GET.get("from", "replica")
    if source == "replica":
        database = router.db_for_read(Note)  # a replica when configured, else the primary
    elif source == "primary":
        database = "default"
    elif source in settings.DATABASES:
        database = source
    else:
        return _error(400, f"from must be replica, primary or one of {sorted(settings.DATABASES)}")
    note = Note.objects.using(database).filter(pk=note_id).first()
    return _json(
        {
            "id": note_id,
            "text": note.text if note else None,
            "written_by": note.written_by if note else None,
            "found": note is not None,
            "database": database,
            "server": settings.RIGGER_SERVER,
        }
    )


# --- Celery ---------------------------------------------------------------------------------


def _enqueued(result, **extra):
    return _json({"task_id": result.id, **extra, "server": settings.RIGGER_SERVER}, 202)


@csrf_exempt
@require_POST
def enqueue_event(request, kind):
    """POST /events/start|complete: enqueues count_survey_event(kind)."""
    if kind not in SurveyCounter.KINDS:
        return _error(400, f"kind must be one of {list(SurveyCounter.KINDS)}")
    return _enqueued(tasks.count_survey_event.delay(kind), kind=kind)


@csrf_exempt
@require_POST
def enqueue_export(request):
    """POST /exports: enqueues export_csv(); the task's result is the CSV's path."""
    return _enqueued(tasks.export_csv.delay())


@csrf_exempt
@require_POST
def enqueue_write_row(request):
    """POST /tasks/write-row {"text": ...}: the worker writes a Note on the primary."""
    text = _request_text(request, default=f"written by a task enqueued on {settings.RIGGER_SERVER}")
    if text is None:
        return _error(400, '"text" must be a non-empty string')
    return _enqueued(tasks.write_note.delay(text), text=text)


@csrf_exempt
@require_POST
def enqueue_slow_note(request):
    """POST /tasks/slow-note {"text": ..., "seconds": n}: a task that sleeps, then writes a Note."""
    text = _request_text(request, default="written after a nap")
    if text is None:
        return _error(400, '"text" must be a non-empty string')
    try:
        seconds = float(request.GET.get("seconds", "5"))
    except ValueError:
        return _error(400, "seconds must be a number")
    return _enqueued(tasks.slow_note.delay(text, seconds), text=text)


@never_cache
@require_GET
def task_status(request, task_id):
    """GET /tasks/<id>[?wait=seconds]: state and result of a task (result stored in Redis).

    With `wait`, blocks up to that many seconds (at most 20) for the task to finish.
    """
    result = AsyncResult(task_id)
    try:
        wait = min(max(float(request.GET.get("wait", "0")), 0.0), MAX_TASK_WAIT_SECONDS)
    except ValueError:
        return _error(400, "wait must be a number of seconds")
    if wait and not result.ready():
        try:
            result.get(timeout=wait, propagate=False, interval=0.1)
        except Exception:  # noqa: BLE001 - a timeout just means "not ready yet"
            pass
    state = result.state
    ready = state in ("SUCCESS", "FAILURE", "REVOKED")
    if state == "SUCCESS":
        value = result.result
    elif state in ("FAILURE", "REVOKED"):
        value = f"{type(result.result).__name__}: {result.result}"
    else:
        value = None
    return _json(
        {
            "task_id": task_id,
            "state": state,
            "ready": ready,
            "successful": state == "SUCCESS",
            "result": value,
        }
    )


@never_cache
@require_GET
def stats(request):
    """GET /stats: counters (primary) and the latest heartbeat on the primary and a replica."""
    counters = {kind: 0 for kind in SurveyCounter.KINDS}
    for row in SurveyCounter.objects.using("default").all():
        counters[row.kind] = row.count

    def latest(queryset):
        beat = queryset.order_by("-created_at", "-id").first()
        return beat.as_dict() if beat else None

    replica_alias = router.db_for_read(Heartbeat) if settings.REPLICA_DATABASES else None
    return _json(
        {
            **_identity(),
            "counters": counters,
            "latest_heartbeat": {
                "primary": latest(Heartbeat.objects.using("default")),
                "replica": latest(Heartbeat.objects.using(replica_alias)) if replica_alias else None,
            },
            "replica_database": replica_alias,
            "heartbeats": Heartbeat.objects.using("default").count(),
        }
    )
