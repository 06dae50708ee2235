"""Inference engines behind the gateway (DESIGN section 3)."""
