"""Control plane: build and validate snapshots, apply changes, serve the admin API."""
