"""Performance tooling, apart from the network: MAC counting, the configurations table, speed
and memory figures, the fast inference path, export and what the hardware can do."""
