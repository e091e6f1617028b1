"""imagegen_proxy: an OpenAI-compatible image-generation gateway as pure-ASGI middleware."""

from .config import ConfigError, ProxyConfig
from .errors import ProxyError
from .middleware import ImageGenProxy
from .request import ImageGenerationBody, ImageRequest

__all__ = [
    "ConfigError",
    "ImageGenProxy",
    "ImageGenerationBody",
    "ImageRequest",
    "ProxyConfig",
    "ProxyError",
]
__version__ = "0.1.0"
