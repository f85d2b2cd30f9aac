"""The outbound guard, with real HTTP servers on loopback. 127.0.0.2 plays an outside host
(the tests' policy calls it public); every other loopback address stays internal."""

from __future__ import annotations

import io
import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from app.services import outbound
from app.services.outbound import OutboundError, Policy
from app.settings import Settings
from tests.helpers import cnn_weights, free_port, run_job

OUTSIDE = "127.0.0.2"
#: Bytes a slow host sends, one a second.
DRIPS = 30


def _outside_only(address: outbound.IPAddress) -> bool:
    return address == ipaddress.ip_address(OUTSIDE)


POLICY = Policy(max_bytes=1 << 20, allowed=_outside_only, grace_seconds=1.0)


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    drip: ClassVar[set[str]] = set()

    def do_GET(self) -> None:
        if self.path in self.drip:  # one byte a second, for DRIPS seconds
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(DRIPS):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:  # the client gave up: as it should
                pass
            return
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"routes": {}, "drip": set()})
    httpd = ThreadingHTTPServer((OUTSIDE, 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://{OUTSIDE}:{httpd.server_port}", handler
    finally:
        httpd.shutdown()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://localhost:8000/",
        "http://[::1]:8000/",
        "http://2130706433/",  # 127.0.0.1, written as one number
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
    ],
)
def test_internal_addresses_are_refused(url: str) -> None:
    with pytest.raises(OutboundError, match="address is not allowed"):
        outbound.check(url, Policy(max_bytes=1))


@pytest.mark.parametrize("url", ["ftp://example.org/w.pt", "file:///etc/passwd", "gopher://x/"])
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(OutboundError, match="only http and https"):
        outbound.check(url, Policy(max_bytes=1))


def test_a_download_from_outside(server: tuple[str, type[_Handler]]) -> None:
    base, handler = server
    handler.routes["/w.pt"] = (200, {}, b"weights")
    out = io.BytesIO()
    assert outbound.download(f"{base}/w.pt", out, POLICY) == 7
    assert out.getvalue() == b"weights"


def test_every_redirect_hop_is_checked(server: tuple[str, type[_Handler]]) -> None:
    base, handler = server
    inside = f"http://127.0.0.1:{free_port()}/secret"
    handler.routes["/in"] = (302, {"Location": inside}, b"")
    handler.routes["/ftp"] = (301, {"Location": "ftp://127.0.0.2/w.pt"}, b"")
    handler.routes["/hop"] = (307, {"Location": "/w.pt"}, b"")
    handler.routes["/w.pt"] = (200, {}, b"ok")
    handler.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(OutboundError, match="address is not allowed"):
        outbound.download(f"{base}/in", io.BytesIO(), POLICY)
    with pytest.raises(OutboundError, match="only http and https"):
        outbound.download(f"{base}/ftp", io.BytesIO(), POLICY)
    assert outbound.download(f"{base}/hop", io.BytesIO(), POLICY) == 2
    with pytest.raises(OutboundError, match="could not be fetched"):
        outbound.download(f"{base}/loop", io.BytesIO(), POLICY)


def test_errors_say_nothing_of_what_answered(server: tuple[str, type[_Handler]]) -> None:
    """Refused, 401, 404 and 500 read alike: no port scanning through error texts."""
    base, handler = server
    handler.routes["/auth"] = (401, {"WWW-Authenticate": "Basic"}, b"secret realm")
    handler.routes["/boom"] = (500, {}, b"Traceback ...")
    closed = f"http://{OUTSIDE}:{free_port()}/w.pt"
    texts = set()
    for url in (f"{base}/auth", f"{base}/boom", f"{base}/missing", closed):
        with pytest.raises(OutboundError) as failed:
            outbound.download(url, io.BytesIO(), POLICY)
        texts.add(str(failed.value).replace(url, "URL"))
    assert texts == {"'URL' could not be fetched"}


def test_a_slow_host_is_cut_off(server: tuple[str, type[_Handler]]) -> None:
    """One byte a second: under the least rate once the grace period is over."""
    base, handler = server
    handler.drip.add("/drip")
    sink = io.BytesIO()
    with pytest.raises(OutboundError, match="could not be fetched"):
        outbound.download(f"{base}/drip", sink, POLICY)
    assert len(sink.getvalue()) < DRIPS  # cut off before the body ended


def test_a_failed_download_or_expert_leaves_no_file(
    client: TestClient,
    settings: Settings,
    sent: list[str],
    server: tuple[str, type[_Handler]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, handler = server
    handler.routes["/junk.pt"] = (200, {}, b"not a state dict at all")
    handler.routes["/w.pt"] = (200, {}, cnn_weights())
    monkeypatch.setattr(outbound, "public", _outside_only)
    form = {"architecture": "cnn-4x1", "input_size": "28"}
    inside = {**form, "name": "in", "weights_uri": "http://127.0.0.1:1/w.pt"}
    refused = client.post("/v1/experts", data=inside)
    assert refused.status_code == 422  # refused at registration already
    assert "address is not allowed" in refused.json()["detail"]
    experts = settings.data_dir / "experts"

    def files() -> set[Path]:
        return {p for p in experts.rglob("*") if p.is_file()}

    before = files()
    junk = {**form, "name": "junk", "weights_uri": f"{base}/junk.pt"}
    assert client.post("/v1/experts", data=junk).status_code == 202
    run_job(settings, sent[-1])
    assert client.get("/v1/experts/junk").json()["status"] == "failed"
    assert files() == before  # the downloaded bytes went with the failed expert
    good = {**form, "name": "good", "weights_uri": f"{base}/w.pt"}
    assert client.post("/v1/experts", data=good).status_code == 202
    run_job(settings, sent[-1])
    assert client.get("/v1/experts/good").json()["status"] == "ready"
    assert len(files() - before) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of 169.254.169.254
        "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
        "http://[64:ff9b:1::a00:1]/",  # local-use NAT64
        "http://[2002:7f00:1::1]/",  # 6to4 of 127.0.0.1
        "http://[2002:c0a8:101::]/",  # 6to4 of 192.168.1.1
        "http://[2001:0:a00:1::1]/",  # Teredo, server 10.0.0.1
        "http://[::7f00:1]/",  # IPv4-compatible 127.0.0.1
        "http://[::a00:1]/",  # IPv4-compatible 10.0.0.1
        "http://[::ffff:0:a00:1]/",  # IPv4-translated 10.0.0.1
        "http://[::ffff:a9fe:a9fe]/",  # IPv4-mapped 169.254.169.254
    ],
)
def test_an_internal_ipv4_inside_an_ipv6_address_is_refused(url: str) -> None:
    with pytest.raises(outbound.NotAllowedError, match="address is not allowed"):
        outbound.check(url, Policy(max_bytes=1))
    # And at connection time: a POST checks the address it connects to, again.
    with pytest.raises(outbound.NotAllowedError, match="address is not allowed"):
        outbound.post(url, b"{}", {}, Policy(max_bytes=0, deadline_seconds=1.0))


@pytest.mark.parametrize(
    "address", ["64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111", "8.8.8.8"]
)
def test_a_public_ipv4_inside_an_ipv6_address_stays_allowed(address: str) -> None:
    assert outbound.public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1/",
        "http://[::1/hook",
        "https://[64:ff9b::/",
        "http://example.org:99999/",
        "http://example.org/a b",
        "http://example.org/a\tb",
        "http://exa\nmple.org/",
        "http://example.org/\x00",
        "http://example.org/\x7f",
        "http://example.org/caf\u00e9",
        "http://\u0435xample.org/",  # a Cyrillic e
    ],
)
def test_a_malformed_url_is_refused_before_any_connection(url: str) -> None:
    with pytest.raises(outbound.NotAllowedError, match="not a valid URL"):
        outbound.check(url, Policy(max_bytes=1))
