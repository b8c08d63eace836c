"""TLS with real certificates from a throwaway CA (trustme): serving HTTPS from flags,
mutual TLS, and https workers verified against a private CA."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from controller import ControllerConfig
from controller.cli import load_config

from .conftest import RunController, post_ok, register_body


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """The CA's certificate and a key and certificate for 127.0.0.1, as files."""
    cert = ca.issue_cert("127.0.0.1")
    paths = {"ca": tmp_path / "ca.pem", "key": tmp_path / "key.pem", "cert": tmp_path / "cert.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(paths["cert"]), append=i > 0)
    return {k: str(v) for k, v in paths.items()}


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


def test_either_file_flag_implies_ssl(files: dict[str, str]) -> None:
    """--ssl-certfile and --ssl-keyfile serve HTTPS without --ssl; one alone takes the other
    from SSL_KEYFILE/SSL_CERTFILE."""
    config, _ = load_config(["--ssl-certfile", files["cert"], "--ssl-keyfile", files["key"]], {})
    assert config.scheme == "https" and config.ssl_keyfile == files["key"]
    config, _ = load_config(["--ssl-certfile", files["cert"]], {"SSL_KEYFILE": files["key"]})
    assert config.scheme == "https"


def test_ssl_environment_is_read_only_when_tls_is_asked_for(files: dict[str, str]) -> None:
    """As today: SSL_KEYFILE and SSL_CERTFILE alone do not turn TLS on."""
    config, _ = load_config([], {"SSL_KEYFILE": files["key"], "SSL_CERTFILE": files["cert"]})
    assert config.scheme == "http"


def test_mutual_tls_needs_tls(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """--ssl-client-ca-certs without a certificate to serve exits 2 saying so."""
    with pytest.raises(SystemExit):
        load_config(["--ssl-client-ca-certs", files["ca"]], {})
    assert "needs TLS" in capsys.readouterr().err


async def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    run_controller: RunController, ca: trustme.CA, files: dict[str, str]
) -> None:
    """With --ssl-client-ca-certs a client without a certificate cannot connect; one with a
    certificate signed by that CA can."""
    config = ControllerConfig(
        host="127.0.0.1",
        port=0,
        ssl_certfile=files["cert"],
        ssl_keyfile=files["key"],
        ssl_client_ca_certs=files["ca"],
    )
    controller = await run_controller(config)
    url = f"{controller.url}/test_connection"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(url, ssl=client_context(ca)) as r:
                await r.read()
        with_cert = client_context(ca, ca.issue_cert("worker-a"))
        async with http.get(url, ssl=with_cert) as r:
            assert r.status == 200


@pytest.fixture
async def https_worker(files: dict[str, str]) -> AsyncIterator[str]:
    """A worker serving HTTPS with a certificate from the private CA."""

    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response({"model_names": ["m"], "speed": 1, "queue_length": 0})

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=b'{"text": "secure", "error_code": 0}\0')

    app = web.Application()
    app.router.add_post("/worker_get_status", status)
    app.router.add_post("/worker_generate_stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files["cert"], files["key"])
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def plain(**kwargs: Any) -> ControllerConfig:
    return ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, **kwargs)


async def test_https_workers_are_verified_against_the_worker_ca(
    run_controller: RunController,
    http: aiohttp.ClientSession,
    https_worker: str,
    files: dict[str, str],
) -> None:
    """With --worker-ca-certs the status probe (aiohttp session) and the stream (the relay's
    own pool) reach a worker whose certificate the private CA signed."""
    controller = await run_controller(plain(worker_ca_certs=files["ca"]))
    await post_ok(http, controller, "/register_worker", register_body(https_worker))
    assert controller.registry.get(https_worker) is not None
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        assert b"secure" in await r.read()


async def test_without_the_worker_ca_a_private_certificate_is_refused(
    run_controller: RunController, http: aiohttp.ClientSession, https_worker: str
) -> None:
    """Without --worker-ca-certs the system's trust store does not know the private CA: the
    probe fails and nothing is registered."""
    controller = await run_controller(plain())
    await post_ok(http, controller, "/register_worker", register_body(https_worker))
    assert controller.registry.get(https_worker) is None
