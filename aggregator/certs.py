"""`gefl certs`: the small PKI of one federation, made with the `cryptography` package.

A federation needs three kinds of certificate, all signed by one CA of its own:

  DIR/ca.crt, DIR/ca.key                     the CA: its certificate goes to every device, the
                                             aggregator and the broker; its key stays here
  DIR/server.crt, DIR/server.key             the aggregator's (or the Mosquitto broker's) certificate,
                                             for the DNS names and IP addresses clients dial
  DIR/clients/NAME.crt, DIR/clients/NAME.key one per device; its common name is the device's name,
                                             which is also its `--name` and, with Mosquitto's
                                             `use_identity_as_username`, its MQTT username

The same files serve gRPC (grpcio's ssl credentials) and Mosquitto (cafile / certfile / keyfile,
`require_certificate true`): P-256 keys in unencrypted PKCS#8 PEM, SHA-256 signatures, and the
extensions strict verifiers ask for (a critical basicConstraints and keyUsage, subject and
authority key identifiers, serverAuth / clientAuth extended key usage, names in subjectAltName).

Running it again on the same DIR reuses the CA and keeps every file that exists: only what is
missing is issued. That is how a new board is enrolled (`gefl certs --out DIR --client board-07`)
without re-keying the aggregator or the other boards, which keep trusting the same CA. A CA is
never overwritten: losing its key would mean re-issuing every certificate of the federation.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gefl.errors import GeflError
from gefl.files import atomic_write, read_file
from gefl.protocol import MAX_NAME, valid_client_name

DEFAULT_SERVER_NAMES = ("localhost",)
DEFAULT_SERVER_IPS = ("127.0.0.1",)
CA_DAYS = 3650
"""The CA outlives the certificates it signs: a board enrolled in year four still gets a full term."""
DEFAULT_DAYS = 1825
"""Server and client certificates: five years, since a board in the field is rarely revisited and an
expired certificate stops it without a word on the board itself (the handshake just fails)."""
MAX_COMMON_NAME = 64
"""X.509's upper bound for a common name (RFC 5280 ub-common-name)."""
_BACKDATE = datetime.timedelta(minutes=5)
"""notBefore slightly in the past: a board whose clock runs a little behind still accepts a new certificate."""
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?\Z")


@dataclass(frozen=True)
class Layout:
    """Where `gefl certs` puts each file under its output directory (the one place that says so)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def clients(self) -> Path:
        return self.root / "clients"

    def client_cert(self, name: str) -> Path:
        return self.clients / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.clients / f"{name}.key"


@dataclass
class Issued:
    """What one `issue()` call did: the files it wrote and those it found and left alone."""

    layout: Layout
    ca_reused: bool
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)
    """Every device name asked for, issued now or earlier."""
    server_names: list[str] = field(default_factory=list)
    """The DNS names and IP addresses in the server certificate (the one on disk, if it was kept)."""


# ---------------------------------------------------------------------------------------- checks
def check_server_names(names: Sequence[str]) -> list[str]:
    """DNS names for the server certificate, checked: a typo here shows up much later as a failed
    handshake on every board, so it is refused now. IP addresses belong in --server-ip, since
    TLS clients match an address against IP entries only, never against a DNS entry."""
    checked = []
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            raise GeflError(f"--server-name {name!r} is an IP address: give it with --server-ip, since clients "
                            "that dial an address check it against the certificate's IP entries only")
        if len(name) > 253 or not _DNS_NAME.match(name):
            raise GeflError(f"--server-name {name!r} is not a valid DNS name: letters, digits and hyphens in "
                            "dot-separated labels (e.g. aggregator.lan), optionally starting with *.")
        checked.append(name.rstrip(".").lower())
    return _unique(checked)


def check_server_ips(ips: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """IP addresses for the server certificate, checked."""
    checked = []
    for ip in ips:
        try:
            checked.append(ipaddress.ip_address(ip))
        except ValueError:
            raise GeflError(f"--server-ip {ip!r} is not an IP address (e.g. 192.168.1.10 or fd00::1); "
                            "host names go in --server-name") from None
    return _unique(checked)


def check_client_names(names: Sequence[str]) -> list[str]:
    """Device names, checked against the aggregator's own rule (gefl.protocol.valid_client_name):
    a certificate for a name the aggregator refuses, or that cannot be an MQTT topic level, is useless."""
    for name in names:
        if not valid_client_name(name):
            raise GeflError(f"--client {name!r} is not a valid device name: 1-{MAX_NAME} letters, digits and "
                            "._:@-, starting with a letter or digit (a hostname fits)")
        if len(name) > MAX_COMMON_NAME:
            raise GeflError(f"--client {name!r} has {len(name)} characters; a certificate's common name holds at "
                            f"most {MAX_COMMON_NAME}: use a shorter device name")
    return _unique(list(names))


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------- files
def _write(path: Path, data: bytes, private: bool) -> None:
    """Write through a temporary file and rename, so an interrupted run never leaves half a PEM file
    where the next run would take it for a finished one. Private keys get mode 0600 from the start,
    not after the fact, so they are never readable by others for an instant."""
    try:
        atomic_write(path, data, 0o600 if private else 0o644)
    except OSError as exc:
        raise GeflError(f"cannot write {path}: {exc.strerror}") from exc


def _mkdir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise GeflError(f"{path} exists and is not a directory: give --out a directory (new or one that "
                        "`gefl certs` wrote)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeflError(f"cannot create the directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise GeflError(f"cannot read and write the directory {path}: check its owner and permissions")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: the aggregator, the broker and a board's service start unattended, with nobody to
    # type a passphrase; the file mode (0600) protects it instead.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    """A PEM certificate from disk, or a GeflError that names the file."""
    try:
        return x509.load_pem_x509_certificate(read_file(path, what))
    except ValueError as exc:
        raise GeflError(f"{path} is not a PEM certificate ({exc})") from exc


def _load_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(read_file(path, what), password=None)
    except (ValueError, TypeError) as exc:  # TypeError: encrypted with a passphrase
        raise GeflError(f"{path} is not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise GeflError(f"{path} is a {type(key).__name__.lstrip('_')}, not the EC key `gefl certs` makes")
    return key


# ---------------------------------------------------------------------------------------- certificates
def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gefl-edge"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             not_after: datetime.datetime) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - _BACKDATE).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))


def _new_ca(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name(common)
    cert = (_builder(name, key, name, now + datetime.timedelta(days=CA_DAYS))
            # path_length 0: this CA signs the federation's own certificates, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(common: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, days: int, *,
          usage: x509.ObjectIdentifier, names: list[x509.GeneralName] | None = None,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    # Never past the CA's own end: a verifier would refuse the certificate from that day anyway.
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (_builder(_name(common), key, ca_cert.subject, not_after)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def common_name(cert: x509.Certificate) -> str:
    """The certificate's CN (a device's name, for client certificates)."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attributes[0].value) if attributes else ""


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for, as text."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def _existing_ca(layout: Layout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA already in the directory, checked to be whole and usable, or None when there is none."""
    has_cert, has_key = layout.ca_cert.exists(), layout.ca_key.exists()
    if not has_cert and not has_key:
        return None
    if not (has_cert and has_key):
        present, missing = (layout.ca_cert, layout.ca_key) if has_cert else (layout.ca_key, layout.ca_cert)
        raise GeflError(f"{present} exists but {missing} does not: a CA needs both to sign new certificates. "
                        f"Put the missing file back, or give --out a new directory for a new CA (whose "
                        "certificates the existing devices will not trust)")
    cert, key = load_cert(layout.ca_cert, "CA certificate"), _load_key(layout.ca_key, "CA key")
    if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo):
        raise GeflError(f"{layout.ca_key} is not the key of {layout.ca_cert}: they belong to different CAs")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise GeflError(f"{layout.ca_cert} is not a CA certificate (no basicConstraints CA:TRUE)")
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.timezone.utc):
        raise GeflError(f"the CA {layout.ca_cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}: make a new one "
                        "in a new --out directory and issue every certificate again")
    return cert, key


def _existing_pair(cert: Path, key: Path, ca_cert: x509.Certificate) -> bool:
    """Whether a certificate and its key are already there (and signed by this CA); half a pair is an error."""
    if not cert.exists() and not key.exists():
        return False
    if not (cert.exists() and key.exists()):
        present, missing = (cert, key) if cert.exists() else (key, cert)
        raise GeflError(f"{present} exists but {missing} does not; remove {present} to issue a new pair")
    try:
        load_cert(cert).verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise GeflError(f"{cert} was not signed by the CA in {ca_cert.subject.rfc4514_string()!r} of this "
                        f"directory; remove it and its key to issue a new pair") from None
    return True


def issue(out: str | Path, *, server_names: Sequence[str] | None = None, server_ips: Sequence[str] | None = None,
          clients: Sequence[str] = (), days: int = DEFAULT_DAYS, server: bool = True) -> Issued:
    """Make or extend the PKI in `out`: the CA if there is none, the server certificate if there is
    none, and a certificate for each name in `clients` that has none. Existing files are never
    rewritten; new ones are signed by the CA found there.

    `server_names` / `server_ips` (None: localhost and 127.0.0.1) are what a new server certificate
    covers. Given explicitly for a directory whose server certificate covers other names, they are
    refused rather than ignored: quietly keeping the old certificate would fail later, on every board.
    `server=False` makes no server certificate (a CA for tests of a wrong CA, or client-only runs).
    """
    if days < 1:
        raise GeflError(f"--days must be at least 1, got {days}")
    explicit = server_names is not None or server_ips is not None
    dns = check_server_names(server_names or ()) if explicit else list(DEFAULT_SERVER_NAMES)
    ips = check_server_ips(server_ips or ()) if explicit else check_server_ips(DEFAULT_SERVER_IPS)
    if server and not dns and not ips:
        raise GeflError("the server certificate needs at least one --server-name or --server-ip")
    names = check_client_names(clients)
    layout = Layout(Path(out))
    _mkdir(layout.root)

    found = _existing_ca(layout)
    result = Issued(layout, ca_reused=found is not None, clients=names)
    if found is None:
        # A random suffix tells two federations' CAs apart in error messages and `openssl x509 -text`.
        ca_cert, ca_key = _new_ca(f"gefl-edge federation CA {secrets.token_hex(4)}")
        _write(layout.ca_key, _key_pem(ca_key), private=True)
        _write(layout.ca_cert, _cert_pem(ca_cert), private=False)
        result.written += [layout.ca_cert, layout.ca_key]
    else:
        ca_cert, ca_key = found
        result.kept += [layout.ca_cert, layout.ca_key]

    if server:
        wanted = [*dns, *(str(ip) for ip in ips)]
        if _existing_pair(layout.server_cert, layout.server_key, ca_cert):
            have = subject_alt_names(load_cert(layout.server_cert))
            if explicit and set(have) != set(wanted):
                raise GeflError(f"{layout.server_cert} already exists for {', '.join(have) or 'no names'}, not "
                                f"{', '.join(wanted)}. To issue a new one, remove {layout.server_cert} and "
                                f"{layout.server_key} and run again: the devices need nothing new, since the CA "
                                "stays the same")
            result.kept += [layout.server_cert, layout.server_key]
            result.server_names = have
        else:
            san: list[x509.GeneralName] = [*(x509.DNSName(n) for n in dns), *(x509.IPAddress(ip) for ip in ips)]
            cert, key = _leaf(wanted[0], ca_cert, ca_key, days, usage=ExtendedKeyUsageOID.SERVER_AUTH, names=san)
            _write(layout.server_key, _key_pem(key), private=True)
            _write(layout.server_cert, _cert_pem(cert), private=False)
            result.written += [layout.server_cert, layout.server_key]
            result.server_names = wanted

    if names:
        _mkdir(layout.clients)
    for name in names:
        cert_path, key_path = layout.client_cert(name), layout.client_key(name)
        if _existing_pair(cert_path, key_path, ca_cert):
            result.kept += [cert_path, key_path]
            continue
        # No subjectAltName: device names may hold ':' or '@', which are not DNS names, and nothing
        # checks a client's address; gRPC and Mosquitto (use_identity_as_username) read the CN.
        cert, key = _leaf(name, ca_cert, ca_key, days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        _write(key_path, _key_pem(key), private=True)
        _write(cert_path, _cert_pem(cert), private=False)
        result.written += [cert_path, key_path]
    return result


def describe(result: Issued, listen_port: int = 50051) -> str:
    """What `gefl certs` prints: each file written or kept, then the aggregator's and a device's command."""
    layout = result.layout
    roles = {layout.ca_cert: "CA certificate: copy to the aggregator and to every device",
             layout.ca_key: "CA key: keep it here, private; it signs every new device",
             layout.server_cert: "aggregator certificate for " + ", ".join(result.server_names),
             layout.server_key: "aggregator key: copy to the aggregator only"}
    lines = []
    written = set(result.written)
    order = [*roles, *(p for name in result.clients for p in (layout.client_cert(name), layout.client_key(name)))]
    for path in sorted([*result.written, *result.kept], key=order.index):
        role = roles.get(path)
        if role is None:
            device = path.stem
            role = (f"certificate of device {device}" if path.suffix == ".crt"
                    else f"key of device {device}: copy to that device only")
        lines.append(f"{'wrote' if path in written else 'kept '} {path}  ({role})")
    host = result.server_names[0] if result.server_names else "AGGREGATOR-HOST"
    device = result.clients[0] if result.clients else "NAME"
    lines += ["", "aggregator (mutual TLS: only devices with a certificate of this CA get in):",
              f"  gefl aggregator serve --listen 0.0.0.0:{listen_port} --state-dir STATE_DIR "
              f"--tls-cert {layout.server_cert} --tls-key {layout.server_key} --client-ca {layout.ca_cert}",
              f"device {device} (with ca.crt, {device}.crt and {device}.key copied onto it):",
              f"  gefl client run --aggregator {host}:{listen_port} --data-dir DATA_DIR --name {device} "
              f"--ca {layout.ca_cert} --cert {layout.client_cert(device)} --key {layout.client_key(device)} "
              "--token-file TOKEN_FILE"]
    if not result.clients:
        lines.append(f"  (no device certificates yet: add one with gefl certs --out {layout.root} --client NAME)")
    lines.append("a Mosquitto broker takes the same files (cafile ca.crt, certfile server.crt, keyfile server.key; "
                 "require_certificate true and use_identity_as_username true to admit devices by certificate: "
                 "see configs/mosquitto/mosquitto.conf)")
    return "\n".join(lines)
