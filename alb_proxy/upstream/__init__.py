"""Backends: server groups, schedulers, health checks, connection pool, backend client."""
