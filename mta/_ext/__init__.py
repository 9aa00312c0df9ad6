"""Compiled hot paths (built from ``ext/*.pyx`` by setup.py).

Import them through :mod:`mta.native`, never directly.
"""
