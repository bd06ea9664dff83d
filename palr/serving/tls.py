"""TLS files of the servers and their clients, in one place.

- **Checked when read.** A key that is not the certificate's, a CA file without a certificate, a certificate that
  has expired or is not valid yet: refused naming the flag and the file. gRPC said "Failed to bind to address" for
  the first, and started with the others, then failed every handshake while health said SERVING.
- **Re-read when they change (servers).** cert-manager renews a mounted Secret in place. A server kept the bytes it
  read at start-up and failed every handshake once they expired. gRPC asks `ServerTls.fetch` before each new
  connection: it stats the files and loads them again when they changed and pass the checks (else it keeps serving
  the previous ones, logged).
- **Expiry reported.** `on_certificate(not_after)` each time a certificate is loaded: the servers export it as
  `recsys_tls_certificate_expiry_timestamp_seconds{role}` (palr/serving/metrics.py) for an alert days ahead. A
  client's files are read once, when its channel is opened: renewing them needs a restart.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509

log = logging.getLogger(__name__)

EXPIRY_WARNING_S = 7 * 86400  # a certificate this close to its end is warned about when read
OnCertificate = Callable[[float], None]  # called with a loaded certificate's end of validity (unix time)


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def certificates(path: Path, flag: str) -> list[x509.Certificate]:
    """The certificates of a PEM file, in order; ValueError naming `flag` when it holds none."""
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError as e:
        raise ValueError(f"{flag} {path}: no PEM certificate in it ({e})") from None


def check_certificate(path: Path, flag: str, now: float | None = None) -> float:
    """When the file's certificate stops being valid (unix time); ValueError if it has, or has not started to."""
    certificate = certificates(path, flag)[0]
    now = time.time() if now is None else now
    start, end = certificate.not_valid_before_utc.timestamp(), certificate.not_valid_after_utc.timestamp()
    if now >= end:
        raise ValueError(f"{flag} {path}: the certificate expired on {_when(end)}; renew it")
    if now < start:
        raise ValueError(f"{flag} {path}: the certificate is valid only from {_when(start)} (is this machine's clock "
                         f"right?)")
    if end - now < EXPIRY_WARNING_S:
        log.warning("%s %s: the certificate expires on %s, in %.1f days", flag, path, _when(end), (end - now) / 86400)
    return end


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load (gRPC takes none) instead of OpenSSL prompting on the terminal


def check_key_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> float:
    """`check_certificate` of `cert`, and ValueError unless `key` is its private key."""
    end = check_certificate(cert, cert_flag)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        raise ValueError(f"{key_flag} {key} is not an unencrypted PEM private key of {cert_flag} {cert} "
                         f"({e.reason or e})") from None
    return end


def check_ca(path: Path, flag: str, now: float | None = None) -> None:
    """ValueError unless the file holds a certificate that is valid now: an empty or expired CA verifies nobody. A
    bundle of several (an old CA beside its successor, while rotating) passes when any one is valid."""
    now = time.time() if now is None else now
    spans = [(c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp()) for c in certificates(path, flag)]
    if not any(start <= now < end for start, end in spans):
        raise ValueError(f"{flag} {path}: none of its {len(spans)} certificate(s) is valid now (the last to expire "
                         f"did on {_when(max(end for _, end in spans))}); renew it")


class ServerTls:
    """A server's TLS credentials from `--tls-cert`, `--tls-key` and `--tls-client-ca` (mutual TLS), checked,
    and re-read by gRPC's fetcher when the files change."""

    FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca")

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None,
                 on_certificate: OnCertificate = lambda _end: None):
        self.files = tuple(Path(f) if f else None for f in (cert, key, client_ca))
        self.on_certificate = on_certificate
        self.not_after = 0.0  # the loaded certificate's end of validity (unix time)
        self._stamp = self._stamps()
        self._initial = self._configuration()  # refused here, at start-up: ValueError naming the flag

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self.fetch,
                                                   require_client_authentication=self.files[2] is not None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, before each new connection: the files' configuration when they changed and pass the
        checks; else None (gRPC keeps the previous one). Never raises (it runs on a gRPC thread)."""
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            self._stamp = stamp  # a change that fails the checks is tried again at its next change, not per connection
            configuration = self._configuration()
        except (OSError, ValueError) as e:  # a Secret being swapped, a key not yet written beside its certificate
            log.error("the TLS files changed and cannot be used (%s): still serving the previous ones", e)
            return None
        log.info("the TLS files changed: new connections use them (certificate valid until %s)",
                 _when(self.not_after))
        return configuration

    def _stamps(self) -> tuple:
        """What changes when a file is replaced or rewritten (a Secret's symlink swap included: stat follows it)."""
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (f.stat() for f in self.files if f))

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = self.files
        end = check_key_pair(cert, key, *self.FLAGS[:2])
        if client_ca:
            check_ca(client_ca, self.FLAGS[2])
        configuration = grpc.ssl_server_certificate_configuration(
            [(key.read_bytes(), cert.read_bytes())], root_certificates=client_ca.read_bytes() if client_ca else None)
        self.not_after = end
        self.on_certificate(end)
        return configuration


def client_credentials(ca: Path | None, cert: Path | None, key: Path | None,
                       flags: tuple[str, str, str] = ("tls_ca", "tls_cert", "tls_key"),
                       on_certificate: OnCertificate = lambda _end: None) -> grpc.ChannelCredentials:
    """A client's TLS credentials (`ca` verifies the server; `cert` + `key`: this client's identity for mutual
    TLS), checked (`flags`: the options that named the files, for the errors)."""
    if ca:
        check_ca(ca, flags[0])
    if cert:
        on_certificate(check_key_pair(cert, key, flags[1], flags[2]))
    return grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes() if ca else None,
                                        private_key=Path(key).read_bytes() if key else None,
                                        certificate_chain=Path(cert).read_bytes() if cert else None)
