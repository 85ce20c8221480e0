from django.urls import path

from polls import views
from polls.health import healthcheck

urlpatterns = [
    # Normally answered by polls.middleware.HealthCheckMiddleware before any host validation;
    # the route is kept so the path also resolves if the middleware is ever removed.
    path("healthcheck.html", healthcheck, name="healthcheck"),
    path("", views.index, name="index"),
    path("session", views.session_json, name="session"),
    path("notes", views.create_note, name="create-note"),
    path("notes/<int:note_id>", views.get_note, name="get-note"),
    path("events/<str:kind>", views.enqueue_event, name="enqueue-event"),
    path("exports", views.enqueue_export, name="enqueue-export"),
    path("tasks/write-row", views.enqueue_write_row, name="enqueue-write-row"),
    path("tasks/slow-note", views.enqueue_slow_note, name="enqueue-slow-note"),
    path("tasks/<str:task_id>", views.task_status, name="task-status"),
    path("stats", views.stats, name="stats"),
]
