"""A minimal Django project: the host app that imagegen_proxy wraps in asgi.py."""

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "django_site.urls"
INSTALLED_APPS: list[str] = []
# Django's middleware never sees the proxied requests: the proxy answers them first.
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
# The proxy's access log (one JSON line a request) and warnings, on the console: plain
# uvicorn sets up its own loggers only.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"imagegen_proxy": {"handlers": ["console"], "level": "INFO"}},
}
