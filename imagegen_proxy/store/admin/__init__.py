"""What the Admin API changes in the store: projects and their policy (model permissions,
spend limit, limits), service accounts and a project's keys, and its rate limits by model.

Lists come in pages of OpenAI's kind: in creation order, after (or before) an object's id.
"""

from .common import BadCursor, NotFound, Page, paginate
from .projects import Projects
from .rate_limits import RATE_LIMIT_PREFIX, RateLimitRecord, RateLimits, model_of
from .service_accounts import ProjectKeyRecord, ServiceAccountRecord, ServiceAccounts


class Admin(ServiceAccounts, RateLimits):
    """The Admin API's operations on `store`'s tables, one part per resource: `Projects`,
    `ServiceAccounts` (and their keys), `RateLimits`."""


__all__ = [
    "RATE_LIMIT_PREFIX",
    "Admin",
    "BadCursor",
    "NotFound",
    "Page",
    "ProjectKeyRecord",
    "Projects",
    "RateLimitRecord",
    "RateLimits",
    "ServiceAccountRecord",
    "ServiceAccounts",
    "model_of",
    "paginate",
]
