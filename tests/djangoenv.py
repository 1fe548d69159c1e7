"""Django configured once per test process, with per-test databases added as aliases.

Django's settings are process-global and can be configured once; tests create a database each, so
each test registers its own alias instead of reconfiguring."""

from __future__ import annotations

from typing import Any

from psycopg.conninfo import conninfo_to_dict


def setup() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(DATABASES={}, USE_TZ=True, INSTALLED_APPS=[], MIDDLEWARE=[], ALLOWED_HOSTS=["*"],
                           ROOT_URLCONF="tests.djangoenv", CACHES={"default": {
                               "BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
        django.setup()


def use_database(alias: str, dsn: str) -> Any:
    """Register ``dsn`` as Django database ``alias`` and return its connection."""
    setup()
    from django.db import connections

    params = conninfo_to_dict(dsn)
    connections.settings[alias] = {**connections.settings["default"], "ENGINE": "django.db.backends.postgresql",
                                   "NAME": params["dbname"], "USER": params.get("user", ""),
                                   "HOST": params.get("host", ""), "PORT": str(params.get("port", ""))}
    return connections[alias]


def order_model() -> Any:
    """An unmanaged model over the example schema's ``orders`` table (defined once per process)."""
    global _ORDER
    if _ORDER is None:
        setup()
        from django.db import models

        class Order(models.Model):
            id = models.BigIntegerField(primary_key=True)
            user_id = models.BigIntegerField()
            tenant_id = models.IntegerField()
            total = models.DecimalField(max_digits=12, decimal_places=2)
            status = models.TextField()

            class Meta:
                app_label = "cdcdtests"
                db_table = "orders"
                managed = False

        _ORDER = Order
    return _ORDER


_ORDER: Any = None
urlpatterns: list[Any] = []  # ROOT_URLCONF: tests add their views here
