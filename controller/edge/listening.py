"""What the standalone controller's listening socket needs before it opens: its TLS
context, and a descriptor limit that can hold every connection the caps allow."""

from __future__ import annotations

import ssl

from ..config import ControllerConfig

__all__ = ["descriptor_shortfall", "server_ssl_context"]

#: descriptors kept for the listening socket, the state file, logs and DNS
SPARE_DESCRIPTORS = 64


def descriptor_shortfall(max_connections: int, max_worker_connections: int) -> str | None:
    """A warning when the soft descriptor limit cannot hold every connection the caps
    allow (then the kernel, not the caps, would refuse new clients); else ``None``."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + max_worker_connections + SPARE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (
        f"The descriptor limit ({soft}) is below --max-connections + --max-worker-connections "
        f"+ {SPARE_DESCRIPTORS} ({needed}): near it, new clients fail to connect instead of "
        "idle ones being closed to make room. Raise the limit (ulimit -n) or lower the caps"
    )


def server_ssl_context(config: ControllerConfig) -> ssl.SSLContext | None:
    """The listening socket's TLS context, or ``None`` for plain HTTP."""
    if config.ssl_certfile is None or config.ssl_keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    if config.ssl_client_ca_certs is not None:
        # Mutual TLS: no certificate signed by this CA, no handshake.
        context.load_verify_locations(cafile=config.ssl_client_ca_certs)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
