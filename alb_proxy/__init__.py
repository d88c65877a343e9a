"""alb-proxy: a TLS-termination edge proxy that behaves like a cloud ALB listener."""

__version__ = "0.1.0"
