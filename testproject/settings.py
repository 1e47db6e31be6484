"""Settings for testproject: a chat that runs on any crossws_channels driver.

No database: the chat keeps nothing. The channel layer comes from the environment
(see :mod:`testproject.layers`); ``TESTPROJECT_EMBEDDED_WORKER=1`` makes a server process
also run the ``chat-jobs`` worker (see :mod:`testproject.chat.workers`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from testproject.layers import channel_layers_from_env

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "testproject-insecure-key-for-local-use-only")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "daphne",
    "channels",
    "crossws_channels",
    "testproject.chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "testproject.urls"
ASGI_APPLICATION = "testproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    },
]

DATABASES: dict[str, Any] = {}

CHANNEL_LAYERS = channel_layers_from_env(os.environ)

# The backplane status page (/backplane/): see testproject.chat.views.status_access.
CROSSWS_CHANNELS_STATUS_ACCESS = "testproject.chat.views.status_access"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"

# The worker's and the chat's own messages, once each, with the pid. crossws_channels' own
# loggers are left to propagate to the root logger (daphne configures it; tests capture it).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "process": {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "process"},
    },
    "loggers": {
        name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
        for name in ("django.channels", "testproject")
    },
}
