"""Pure-Python twins of the compiled modules in ``mta._ext``.

Each twin has the same public API as its compiled module and is the readable
specification of it; the same tests run against both.
"""
