"""Federation TLS certificates: chain, SAN, key permissions."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from common.crypto.certs import make_certificates


def test_server_certificate_is_signed_by_the_ca_and_names_the_hosts(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, hosts=["127.0.0.1", "link.example"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)


def test_private_keys_are_owner_only(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path)
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_needs_a_host(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="host"):
        make_certificates(tmp_path, hosts=[])
