"""The API over TLS, and plain HTTP refused off loopback unless the operator insists."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from freshpool.api.server import ListenError, check_tls
from freshpool.config import ApiTls, ConfigError, parse
from tests.api.conftest import Served


def _self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "api.crt", where / "api.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_the_api_serves_https_with_the_configured_certificate(
    serve_pool: Callable[..., Served], tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    served = serve_pool(api=f"tls: {{cert: {cert}, key: {key}}}", min_ready=0)
    assert served.url.startswith("https://127.0.0.1:")
    with httpx.Client(
        base_url=served.url, verify=ssl.create_default_context(cafile=cert)
    ) as client:
        assert client.get("/healthz").status_code == 200
    # A client that does not trust the certificate is refused by TLS, not served.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(served.url + "/healthz")
    # The CLI trusts a private CA the way operators give it: SSL_CERT_FILE.
    env = {**os.environ, "FRESHPOOL_URL": served.url, "SSL_CERT_FILE": str(cert)}
    listed = served.pool.cli("list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    # Plain HTTP to the TLS port gets no API answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(served.url.replace("https", "http") + "/healthz").raise_for_status()


def test_a_bad_certificate_is_an_error_at_start(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate\n")
    key.write_text("")
    with pytest.raises(ListenError, match=r"api.tls: cannot use cert .*c.pem with key"):
        check_tls(ApiTls(cert=cert, key=key))


BASE = "providers: [{name: local}]\nlabels: [{name: x, image: i}]\nimages: [{name: i}]\n"


def test_plain_http_off_loopback_needs_insecure() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(BASE + "api: {listen: 0.0.0.0}\n", "f.yaml")
    (problem,) = caught.value.problems
    assert "api: listen '0.0.0.0' is reachable from other machines and the API has no TLS" in str(
        problem
    )
    assert parse(BASE + "api: {listen: 0.0.0.0, insecure: true}\n").api.insecure
    assert parse(BASE + "api: {listen: '::1'}\n").api.loopback
    assert parse(BASE + "api: {listen: 10.0.0.5, enabled: false}\n")
