"""Minimal framed ECHO servers, one per model: the yardstick the full backends are compared with."""
