"""The edge-board side of gefl-edge: device probe, client runtime."""
