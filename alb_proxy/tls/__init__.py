"""TLS: ClientHello parsing, security policies, SSL contexts and the MemoryBIO TLS server."""
