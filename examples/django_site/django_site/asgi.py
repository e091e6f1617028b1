"""Django's ASGI application, with image generation served in front of it.

    cd examples/django_site
    IMAGEGEN_PROXY_CONFIG=../config.example.toml uvicorn django_site.asgi:application

Django never sends lifespan events, and nothing here depends on them: the proxy creates
its upstream transport on first use. Its connections close with the process; where the app
lives on (tests, a server with a shutdown hook of its own), `await application.aclose()`
releases them, and a later request makes a new client.
"""

import os

from django.core.asgi import get_asgi_application

from imagegen_proxy import ImageGenProxy, ProxyConfig

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")

application = ImageGenProxy(
    get_asgi_application(), ProxyConfig.from_toml(os.environ["IMAGEGEN_PROXY_CONFIG"])
)
