"""gunicorn configuration for a Channels project on the ``multiprocessing`` driver.

Run it from the project directory, with the project's settings::

    DJANGO_SETTINGS_MODULE=myproject.settings \
        gunicorn -c gunicorn.conf.py myproject.asgi:application

The gunicorn master starts the relay before it forks the workers; the workers (each one
process with its own layer instance) talk to each other through it. Options given on the
command line (``-b``, ``-w``) override the values below.
"""

from crossws_channels.drivers import setup_primary

bind = "127.0.0.1:8000"
workers = 2
# The ASGI worker; the uvicorn-worker package's ``uvicorn_worker.UvicornWorker`` is the
# same class, maintained outside uvicorn.
worker_class = "uvicorn.workers.UvicornWorker"
# Long-lived WebSocket connections: give workers time to say goodbye on a restart.
graceful_timeout = 10


def on_starting(server: object) -> None:
    # Runs once, in the master, before any worker exists. setup_primary() reads
    # CHANNEL_LAYERS and starts one relay per multiprocessing layer (as a child process,
    # which stops when the master exits); it returns once the relay listens.
    setup_primary()
