"""The start-up line: where the controller listens and what is in effect.

``fc-controller running on URL (Press CTRL+C to quit)`` (the prefix deployment scripts
wait for), then ``key=value`` pairs an operator and a log parser can both read: version,
profile, dispatch method, parent, protected roles, state file, registry backend and
configuration file. Credentials inside URLs are redacted.
"""

from __future__ import annotations

import json

from . import __version__
from .config import ControllerConfig, redact_registry
from .credentials import Role
from .worker.tokens import redact_urls

__all__ = ["protected_roles", "startup_line"]


def protected_roles(config: ControllerConfig) -> list[str]:
    """The roles a caller needs credentials (a token or a trusted network) for."""
    access = config.access
    roles = [role.value for role in (Role.WORKER, Role.CLIENT) if not access.is_open(role)]
    if access.admin_tokens:
        roles.append(Role.ADMIN.value)
    return roles


def _value(value: str | None) -> str:
    if value is None or value == "":
        return "none"
    value = redact_urls(value)
    if any(c.isspace() or c in '"=' for c in value):
        return json.dumps(value)
    return value


def startup_line(
    url: str, config: ControllerConfig, profile: str, config_file: str | None = None
) -> str:
    """The line printed once the controller listens at ``url``."""
    fields = {
        "version": __version__,
        "profile": profile,
        "dispatch": config.dispatch_method.value,
        "parent": config.parent_controller,
        "protected": ",".join(protected_roles(config)),
        "state_file": config.state_file,
        # memory, or the Redis URL with its password hidden
        "registry": redact_registry(config.registry),
        "config": config_file,
    }
    pairs = " ".join(f"{key}={_value(value)}" for key, value in fields.items())
    return f"fc-controller running on {redact_urls(url)} (Press CTRL+C to quit) {pairs}"
