"""Run a fuzz target: ``python -m fuzz TARGET [options] [CORPUS_DIR ...]``.

Engines:

- ``atheris`` (default when installed): coverage-guided libFuzzer; every
  libFuzzer option passes through (``-runs=N``, ``-max_total_time=S``,
  ``-seed=N``, ``-jobs=N``, ``-dict=FILE``, ``-artifact_prefix=DIR/``).  The pure
  twins and the acceptor are instrumented as they are imported (the compiled
  modules are not: their twin's coverage guides the search).
- ``--engine=mutate``: a plain mutation fuzzer (no coverage) over the seeds and
  corpus, for machines without atheris; understands ``-runs``, ``-seed``,
  ``-max_total_time``, ``-artifact_prefix`` and ``-timeout``.

``--replay FILE...`` runs saved inputs once each and says which fail.
Without a corpus directory, fuzz/corpus/TARGET/ is used; an empty corpus
directory gets the target's seeds first.  A failing input is written to
``<artifact_prefix>crash-<sha1>`` and the exit status is non-zero.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import random
import signal
import sys
import time
import traceback

from fuzz import TARGETS
from fuzz.mutate import mutate

HERE = os.path.dirname(os.path.abspath(__file__))


def _usage() -> None:
    print(__doc__, file=sys.stderr)
    print("targets: " + ", ".join(TARGETS), file=sys.stderr)
    sys.exit(2)


def _options(args):
    opts, dirs, rest = {}, [], []
    for a in args:
        if a.startswith("-") and "=" in a:
            k, _, v = a.lstrip("-").partition("=")
            opts[k] = v
            rest.append(a)
        elif a.startswith("-"):
            rest.append(a)
        else:
            dirs.append(a)
    return opts, dirs, rest


def _seed_corpus(mod, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        return
    for seed in getattr(mod, "SEEDS", []):
        name = hashlib.sha1(seed).hexdigest()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(seed)


def _load(name: str, instrument: bool):
    if instrument:
        import atheris
        with atheris.instrument_imports(include=["mta", "fuzz", "acceptor", "httptools"]):
            return importlib.import_module(TARGETS[name])
    return importlib.import_module(TARGETS[name])


def replay(mod, files) -> int:
    failed = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            mod.one_input(data)
        except Exception:   # noqa: BLE001 - reported
            failed += 1
            print(f"FAIL {path}", file=sys.stderr)
            traceback.print_exc()
        else:
            print(f"ok   {path}")
    return 1 if failed else 0


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("one input ran longer than -timeout")


def mutate_engine(mod, dirs, opts) -> int:
    """A mutation fuzzer without coverage feedback (seeds, corpus, a dictionary)."""
    rng = random.Random(int(opts.get("seed", "1")))
    runs = int(opts.get("runs", "-1"))
    max_time = float(opts.get("max_total_time", "0")) or None
    timeout = int(opts.get("timeout", "10"))
    max_len = int(opts.get("max_len", "4096"))
    prefix = opts.get("artifact_prefix", "./")
    corpus = list(getattr(mod, "SEEDS", [])) or [b""]
    for d in dirs:
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                corpus.append(f.read())
    tokens = _dict_tokens(opts.get("dict"))
    signal.signal(signal.SIGALRM, _alarm)
    start = time.monotonic()
    done = 0
    while runs < 0 or done < runs:
        if max_time and time.monotonic() - start > max_time:
            break
        data = mutate(rng, rng.choice(corpus), corpus, tokens, max_len) if done else corpus[0]
        signal.alarm(timeout)
        try:
            mod.one_input(data)
        except Exception:   # noqa: BLE001 - reported
            signal.alarm(0)
            path = prefix + "crash-" + hashlib.sha1(data).hexdigest()
            with open(path, "wb") as f:
                f.write(data)
            traceback.print_exc()
            print(f"==ERROR: input {done} failed; saved to {path}", file=sys.stderr)
            return 1
        signal.alarm(0)
        done += 1
        if done % 100_000 == 0:
            print(f"#{done} mutate ({done / (time.monotonic() - start):.0f} exec/s)",
                  file=sys.stderr, flush=True)
    elapsed = time.monotonic() - start
    print(f"Done {done} runs in {elapsed:.0f} second(s)", file=sys.stderr)
    return 0


def _dict_tokens(path):
    tokens = []
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith('"') and line.endswith('"'):
                    tokens.append(line[1:-1].encode().decode("unicode_escape")
                                  .encode("latin-1"))
    return tokens


def main(argv) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        _usage()
    name = argv[1]
    args = argv[2:]
    engine = "atheris"
    if any(a == "--engine=mutate" for a in args):
        engine = "mutate"
    args = [a for a in args if not a.startswith("--engine=")]
    if args and args[0] == "--replay":
        return replay(_load(name, False), args[1:])
    if engine == "atheris":
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed (pip install atheris); using --engine=mutate",
                  file=sys.stderr)
            engine = "mutate"
    opts, dirs, rest = _options(args)
    if not dirs:
        dirs = [os.path.join(HERE, "corpus", name)]
    mod = _load(name, engine == "atheris")
    _seed_corpus(mod, dirs[0])
    default_dict = os.path.join(HERE, "dicts", name + ".dict")
    if "dict" not in opts and os.path.exists(default_dict):
        opts["dict"] = default_dict
        rest.append("-dict=" + default_dict)
    if engine == "mutate":
        return mutate_engine(mod, dirs, opts)
    import atheris
    atheris.Setup([argv[0], *rest, *dirs], mod.one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
