"""Primary/replica routing.

Reads of the replicated models go to one of the replica aliases (replica1, replica2, ...) built
from DATABASE_REPLICA_NAMES; everything else, and every write, goes to `default` (the primary
through PgBouncer). With no replicas configured, everything uses `default`.
"""
import random

from django.conf import settings

READ_FROM_REPLICA = {("polls", "note"), ("polls", "heartbeat")}


class PrimaryReplicaRouter:
    def db_for_read(self, model, **hints):
        replicas = settings.REPLICA_DATABASES
        if replicas and (model._meta.app_label, model._meta.model_name) in READ_FROM_REPLICA:
            return random.choice(replicas)
        return "default"

    def db_for_write(self, model, **hints):
        return "default"

    def allow_relation(self, obj1, obj2, **hints):
        # The replicas hold exactly the primary's data.
        return True

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        # Replicas are read-only copies: schema changes only ever run on the primary.
        return db == "default"
