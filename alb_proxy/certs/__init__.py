"""The certificate layer: parse and check PEM, choose certificates by SNI, make dev certificates.

Pure: no sockets, no ``ssl``, no asyncio (a test checks). Callers read files (``read_pem_file``)
and hand bytes in; the TLS layer turns the values returned here into ``SSLContext`` objects.
"""

from alb_proxy.certs.ca import CaBundle, load_ca_bundle
from alb_proxy.certs.pem import ServerKey, read_pem_file
from alb_proxy.certs.server import ServerCertificate, load_server_certificate
from alb_proxy.certs.sni import CertInfo, Group, SniIndex

__all__ = [
    "CaBundle",
    "CertInfo",
    "Group",
    "ServerCertificate",
    "ServerKey",
    "SniIndex",
    "load_ca_bundle",
    "load_server_certificate",
    "read_pem_file",
]
