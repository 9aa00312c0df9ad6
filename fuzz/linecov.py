"""Which lines of the Python code under test a corpus reaches: ``python -m fuzz.linecov TARGET DIR``.

Replays every input of DIR through TARGET with a line tracer and prints, per
file of interest (the pure twins, the acceptor, the API), the lines reached
of the lines that hold code.  No coverage package needed; slow, for reports.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import types

from fuzz import TARGETS

FILES = {
    "scanner": ["mta/_pure/scanner.py"],
    "record": ["mta/_pure/record.py"],
    "mime_headers": ["mta/_pure/mime.py"],
    "mime_canon": ["mta/_pure/mime.py"],
    "smtp_session": ["mta/acceptor/smtp.py", "mta/acceptor/tls_auth.py"],
    "http_api": ["mta/acceptor/http.py", "mta/api/transmissions.py", "mta/api/build.py",
                 "mta/api/suppression.py"],
    "bus_stream": ["mta/bus/sockets.py", "mta/bus/messages.py"],
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_lines(code: types.CodeType, out: set) -> None:
    for _, _, line in code.co_lines():
        if line is not None and line != code.co_firstlineno:
            out.add(line)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_lines(const, out)


def _run_at_import(code: types.CodeType, out: set) -> None:
    out.update(ln for _, _, ln in code.co_lines() if ln is not None)
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and not const.co_flags & inspect.CO_NEWLOCALS:
            _run_at_import(const, out)     # a class body


def main(argv) -> int:
    name, directory = argv[1], argv[2]
    mod = importlib.import_module(TARGETS[name])
    paths = {os.path.join(REPO, f): f for f in FILES[name]}
    hit: dict[str, set] = {p: set() for p in paths}

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if f not in hit:
            return None
        if event == "line":
            hit[f].add(frame.f_lineno)
        return tracer

    inputs = sorted(os.listdir(directory))
    sys.settrace(tracer)
    try:
        for n in inputs:
            try:
                with open(os.path.join(directory, n), "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:     # a running campaign replaced it
                continue
            mod.one_input(data)
    finally:
        sys.settrace(None)
    for path, rel in paths.items():
        with open(path, encoding="utf-8") as fh:
            code = compile(fh.read(), path, "exec")
        lines: set = set()
        _code_lines(code, lines)
        # module and class bodies run at import, before the tracer: count them as reached
        top: set = set()
        _run_at_import(code, top)
        reached = (hit[path] | top) & lines
        print(f"{rel}: {len(reached)}/{len(lines)} lines ({100 * len(reached) / len(lines):.0f} %)"
              f" with {len(inputs)} inputs; not reached: {sorted(lines - reached)[:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
