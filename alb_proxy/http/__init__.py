"""Front-end HTTP: protocol adapters (h1, h2, h3) and the header rules for forwarding."""
