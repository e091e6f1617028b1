"""Django's ASGI application, with image generation served in front of it.

    python -m imagegen_proxy.mock --port 9000 &     # the upstream proxy.toml points at
    cd examples/django_site
    uvicorn django_site.asgi:application            # IMAGEGEN_PROXY_CONFIG: another TOML

Django never sends lifespan events, and nothing here depends on them: the proxy creates
its upstream transport on first use. Its connections close with the process; where the app
lives on (tests, a server with a shutdown hook of its own), `await application.aclose()`
releases them, and a later request makes a new client.
"""

import os
from pathlib import Path

from django.core.asgi import get_asgi_application

from imagegen_proxy import ImageGenProxy, ProxyConfig

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")

CONFIG = os.environ.get("IMAGEGEN_PROXY_CONFIG") or Path(__file__).parent.parent / "proxy.toml"

application = ImageGenProxy(get_asgi_application(), ProxyConfig.from_toml(CONFIG))
