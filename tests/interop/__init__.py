"""Interoperability tests: fc-controller and FastChat 0.2.36's own components together."""
