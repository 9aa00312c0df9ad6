"""Inputs run and failures per target, from campaign logs: ``python -m fuzz.summary DIR ...``.

Reads DIR/TARGET.log (libFuzzer or the mutate engine) and DIR/TARGET/ (saved
failing inputs) as fuzz/campaign.sh leaves them; prints one line per target.
"""
from __future__ import annotations

import os
import re
import sys


def summarize(log_path: str) -> dict:
    with open(log_path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    runs = 0
    m = re.search(r"stat::number_of_executed_units: (\d+)", text)
    if m:
        runs = int(m.group(1))
    else:
        done = re.findall(r"Done (\d+) runs", text)
        progress = re.findall(r"^#(\d+)", text, re.M)
        runs = int(done[-1]) if done else int(progress[-1]) if progress else 0
    rate = re.findall(r"exec/s: (\d+)", text) or re.findall(r"\((\d+) exec/s\)", text)
    m = re.search(r"stat::average_exec_per_sec:\s+(\d+)", text)
    avg = int(m.group(1)) if m else (int(rate[-1]) if rate else 0)
    engine = "atheris" if "libFuzzer" in text or "INFO: Seed" in text else "mutate"
    failed = bool(re.search(r"==ERROR|Traceback|deadly signal|Divergence", text))
    finished = "Done " in text or "stat::number_of_executed_units" in text
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    return {"runs": runs, "exec/s": avg, "engine": engine, "failure": failed,
            "finished": finished, "cov/ft": "/".join(cov[-1]) if cov else "-"}


def main(argv) -> int:
    for d in argv[1:]:
        for name in sorted(os.listdir(d)):
            if not name.endswith(".log"):
                continue
            s = summarize(os.path.join(d, name))
            saved = os.path.join(d, name[:-4])
            crashes = len(os.listdir(saved)) if os.path.isdir(saved) else 0
            print(f"{d}/{name[:-4]}: {s['engine']} runs={s['runs']} avg_exec/s={s['exec/s']} "
                  f"cov/ft={s['cov/ft']} failures={crashes if crashes else int(s['failure'])} "
                  f"{'ended' if s['finished'] else 'running (or killed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
