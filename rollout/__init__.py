"""Tries and the trajectory store (DESIGN sections 2 and 4)."""
