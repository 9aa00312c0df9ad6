"""delivery: the role that sends queued mail (see main.py)."""
