"""What the Admin API changes in the store: projects and their policy (model permissions,
spend limit, limits), service accounts and a project's keys, and its rate limits by model.

Lists come in pages of OpenAI's kind: in creation order, after (or before) an object's id.
"""

from .service_accounts import (
    RATE_LIMIT_PREFIX,
    Admin,
    BadCursor,
    NotFound,
    Page,
    ProjectKeyRecord,
    RateLimitRecord,
    ServiceAccountRecord,
    model_of,
    paginate,
)

__all__ = [
    "RATE_LIMIT_PREFIX",
    "Admin",
    "BadCursor",
    "NotFound",
    "Page",
    "ProjectKeyRecord",
    "RateLimitRecord",
    "ServiceAccountRecord",
    "model_of",
    "paginate",
]
