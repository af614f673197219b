# voxswap under gunicorn, for operators:
#
#   VOXSWAP_REGISTRY=/srv/voxswap/model_registry VOXSWAP_WORKERS=4 VOXSWAP_ADMIN_TOKEN=... \
#     gunicorn -c deploy/gunicorn.conf.py
#
# Every option is derived from VOXSWAP_* settings (server/settings.py) by server/gunicorn_conf.py:
# uvicorn workers with voxswap's graceful shutdown, the model loaded after fork in each worker,
# a clean PROMETHEUS_MULTIPROC_DIR, dead workers marked, and gunicorn 27's control socket off.
# Do not use `kill -HUP` to upgrade a model: it restarts workers before new ones have loaded.
# Use POST /admin/model/update (or `voxswap registry promote`), which every worker follows.
from server.gunicorn_conf import *  # noqa: F403

# Site-specific overrides go below, for example:
# bind = ["0.0.0.0:7860"]
# timeout = 300            # a 900 MB fp32 model on a slow disk
