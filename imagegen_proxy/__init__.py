"""imagegen_proxy: an OpenAI-compatible image-generation gateway as pure-ASGI middleware.

The public API: the middleware and its configuration, and what its hooks (an
authenticator, a rate limiter, usage observers) are made of. The package's layout is in
the README's "Architecture".
"""

from .config import ConfigError, Policy, ProxyConfig
from .governance.auth import Authenticator, Credentials, Principal, Project
from .governance.ratelimit import Decision, RateLimiter, UsageObserver
from .middleware import ImageGenProxy
from .wire.errors import ProxyError
from .wire.request import ImageGenerationBody, ImageRequest
from .wire.usage import Usage

__all__ = [
    "Authenticator",
    "ConfigError",
    "Credentials",
    "Decision",
    "ImageGenProxy",
    "ImageGenerationBody",
    "ImageRequest",
    "Policy",
    "Principal",
    "Project",
    "ProxyConfig",
    "ProxyError",
    "RateLimiter",
    "Usage",
    "UsageObserver",
]
__version__ = "0.1.0"
