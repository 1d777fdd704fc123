"""The outbox over TLS to a real Mosquitto, with a CA and certificates made by the test: a trusted
broker gets every message; a broker signed by another CA is refused with a clear error and the
messages wait in the outbox."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests._util import wait_for
from tests.gateway._harness import node, running_gateway


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: Any, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_ca(d: Path, cn: str) -> tuple[Any, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = d / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server_cert(d: Path, ca_key: Any, ca_cert: x509.Certificate) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("broker"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = d / "server.pem", d / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@pytest.fixture
def tls_broker(tmp_path: Path, mosquitto_factory: Any) -> tuple[Any, Path, Path]:
    d = tmp_path / "pki"
    d.mkdir()
    ca_key, ca_cert, ca_path = make_ca(d, "test-ca")
    _, _, other_ca = make_ca(d, "other-ca")
    cert, key = make_server_cert(d, ca_key, ca_cert)
    broker = mosquitto_factory(extra=f"certfile {cert}\nkeyfile {key}\n")
    return broker, ca_path, other_ca


def config(tmp_path: Path, port: int, ca: Path) -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
connections:
  plant: {{type: mqtt, host: 127.0.0.1, port: {port}, reconnect_max: 1s, ca_file: "{ca}"}}
pipelines:
  - name: boiler
    nodes:
      - {{id: sim, type: simulate, count: 50, interval: 1, realtime: false,
          sensors: [{{key: s1, base: 50, amplitude: 50, period: 4, noise: 0}}]}}
      - {{id: hot, type: threshold, input: sim, above: 75, clear_below: 25}}
      - {{id: out, type: mqtt_out, input: hot, connection: plant}}
console: {{enabled: false}}
"""


async def test_tls_with_the_right_ca_delivers(tmp_path: Path, tls_broker: tuple[Any, Path, Path]) -> None:
    broker, ca, _ = tls_broker
    text = config(tmp_path, broker.port, ca)
    async with running_gateway(text) as gw:
        out = node(gw, "boiler", "out")
        await wait_for(lambda: out.n_out == 25, timeout=15)
        await wait_for(lambda: gw.outbox.published == 25 and gw.outbox.count == 0, timeout=15)
        assert gw.links.publishers["plant"].connected


async def test_tls_with_a_wrong_ca_is_refused_clearly(tmp_path: Path, tls_broker: tuple[Any, Path, Path]) -> None:
    broker, _, other_ca = tls_broker
    text = config(tmp_path, broker.port, other_ca)
    async with running_gateway(text) as gw:
        link = gw.links.publishers["plant"]
        await wait_for(lambda: link.last_error is not None, timeout=15)
        assert "certificate is not trusted" in link.last_error and "ca_file" in link.last_error
        out = node(gw, "boiler", "out")
        await wait_for(lambda: out.n_out == 25, timeout=15)
        assert gw.outbox.count == 25 and gw.outbox.published == 0  # waiting, not lost
        health = gw.health()
        assert health["status"] == "degraded"
        assert any("certificate is not trusted" in p for p in health["problems"])


async def test_tls_missing_ca_file_says_which(tmp_path: Path, tls_broker: tuple[Any, Path, Path]) -> None:
    broker, _, _ = tls_broker
    text = config(tmp_path, broker.port, tmp_path / "nope.pem")
    async with running_gateway(text) as gw:
        link = gw.links.publishers["plant"]
        await wait_for(lambda: link.last_error is not None, timeout=15)
        assert "cannot use ca_file" in link.last_error and "nope.pem" in link.last_error


def test_key_without_cert_is_a_config_error(tmp_path: Path) -> None:
    text = f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}"}}
connections:
  plant: {{type: mqtt, key_file: /tmp/k.pem}}
"""
    with pytest.raises(ConfigError, match="`key_file` goes with `cert_file`"):
        parse_config(text, "t.yaml", {})
