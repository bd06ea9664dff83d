"""Fixtures for gRPC server tests: an asyncio loop in a thread, where the servers under test run
(so tests stay plain functions using real sync or aio clients), and a throwaway PKI (CA, server
and client certificates, plus a client certificate from a CA the server does not trust) made with
`cryptography` for TLS and mutual-TLS tests over loopback."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Coroutine

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class LoopThread:
    """An event loop running forever in a daemon thread; `run(coro)` waits for a result there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]):
        """Starts `coro` on the loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def server_loop():
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA both sides trust
    server_cert: Path  # for localhost and 127.0.0.1, signed by `ca`
    server_key: Path
    client_cert: Path  # signed by `ca`
    client_key: Path
    rogue_cert: Path  # a client certificate signed by another CA
    rogue_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("test CA")
    rogue_ca_key, rogue_ca_cert = _ca("rogue CA")
    paths = {}
    for name, (key, cert) in {
        "ca": (ca_key, ca_cert),
        "server": _leaf("localhost", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH),
        "client": _leaf("test client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH),
        "rogue": _leaf("rogue client", rogue_ca_key, rogue_ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH),
    }.items():
        paths[f"{name}_cert"] = out / f"{name}.crt"
        paths[f"{name}_key"] = out / f"{name}.key"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return Pki(ca=paths["ca_cert"], server_cert=paths["server_cert"], server_key=paths["server_key"],
               client_cert=paths["client_cert"], client_key=paths["client_key"],
               rogue_cert=paths["rogue_cert"], rogue_key=paths["rogue_key"])


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))


def _ca(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, _name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(common_name: str, ca_key, ca_cert: x509.Certificate, usage):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(common_name, ca_cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())
