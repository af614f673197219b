"""gunicorn configuration shipped inside the package: ``gunicorn -c python:server.gunicorn_conf``.

Everything comes from ``VOXSWAP_*`` environment variables (see server/settings.py); the app is the
factory ``server.app:create_app()``, built in each worker after fork. ``voxswap serve --workers N``
uses the same options without this file. The worker class (``VoxswapWorker``) serves with voxswap's
slow-client protocol: header timeout and connection cap from ``VOXSWAP_HEADER_TIMEOUT_S`` and
``VOXSWAP_MAX_CONNECTIONS``, keep-alive from ``VOXSWAP_KEEPALIVE_TIMEOUT_S``.
"""

from server.logs import configure_logging
from server.settings import Settings
from server.tools.serving import gunicorn_options, prepare_metrics_dir, warn_if_exposed

_settings = Settings()
configure_logging(_settings.log_level, _settings.log_format, _settings.log_file,
                  max_mb=_settings.log_max_mb, backups=_settings.log_backups)
prepare_metrics_dir()  # before any worker imports prometheus_client
warn_if_exposed(_settings)
globals().update(gunicorn_options(_settings))
wsgi_app = "server.app:create_app()"
