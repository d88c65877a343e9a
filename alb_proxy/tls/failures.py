"""Handshake failures named by reason, so an operator can tell why clients are refused.

Pure: maps an ``ssl.SSLError`` to a short, stable label (used as a metric label value) and a
human detail. The labels are part of the metrics contract; add, don't rename.
"""

from __future__ import annotations

import ssl

# OpenSSL reason codes (``SSLError.reason``) -> our label.
_REASONS = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "WRONG_VERSION_NUMBER": "bad_client_hello",  # garbage, not an old client
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "VERSION_TOO_HIGH": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_CIPHERS_AVAILABLE": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "NO_APPLICATION_PROTOCOL": "no_application_protocol",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_client_certificate",
    "HTTP_REQUEST": "http_request",
    "HTTPS_PROXY_REQUEST": "http_request",
    "UNEXPECTED_EOF_WHILE_READING": "client_closed",
    "TLSV1_ALERT_UNKNOWN_CA": "client_rejected_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "client_rejected_certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "client_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "client_rejected_certificate",
    "RECORD_LENGTH_MISMATCH": "bad_record",
    "PACKET_LENGTH_TOO_LONG": "bad_record",
    "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "bad_record",
    "BAD_RECORD_TYPE": "bad_record",
    "UNEXPECTED_MESSAGE": "bad_record",
    "LENGTH_MISMATCH": "bad_client_hello",
    "BAD_PACKET_LENGTH": "bad_client_hello",
    "BAD_EXTENSION": "bad_client_hello",
    "PARSE_TLSEXT": "bad_client_hello",
    "BAD_KEY_SHARE": "bad_client_hello",
    "MISSING_SIGALGS_EXTENSION": "bad_client_hello",
    "BAD_LEGACY_VERSION": "bad_client_hello",
    "UNKNOWN_PROTOCOL": "bad_client_hello",
}

# X509 verify result codes (``SSLCertVerificationError.verify_code``) -> our label.
_VERIFY_CODES = {
    9: "not_yet_valid",  # X509_V_ERR_CERT_NOT_YET_VALID
    10: "expired",  # X509_V_ERR_CERT_HAS_EXPIRED
    2: "unknown_ca",  # unable to get issuer certificate
    18: "unknown_ca",  # self-signed certificate
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    24: "unknown_ca",  # invalid CA certificate
    26: "unsupported_purpose",  # X509_V_ERR_INVALID_PURPOSE (e.g. no clientAuth EKU)
    7: "bad_signature",  # certificate signature failure
    23: "revoked",
}


def classify_ssl_error(exc: ssl.SSLError) -> tuple[str, str]:
    """Return ``(label, detail)`` for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        label = _VERIFY_CODES.get(code, "bad_client_certificate")
        return label, f"client certificate rejected: {exc.verify_message} (code {code})"
    if isinstance(exc, ssl.SSLEOFError):
        return "client_closed", "connection closed during the handshake"
    reason: str = getattr(exc, "reason", None) or ""
    found = _REASONS.get(reason)
    if found is None and reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
        found = "client_alert"
    detail = reason.lower() if reason else str(exc.strerror or exc)
    return found or "other", detail
