"""The load harness behind ``bench/load.py``, split by job.

    common.py      paths, loopback, time bounds; tools, ports, the 220 wait
    procs.py       process control: /proc trees, stopping children, leftovers
    cpu.py         CPU accounting: system busy time, steal, own CPU, background rate
    netns.py       the private network namespace (loopback only)
    source.py      smtp-source runs and the smtplib probe
    run.py         one measured run: acceptance (measure) and end to end (measure_e2e)
    report.py      medians, tables, ratios, RESULTS.md sections, JSON
    revision.py    git: the revision measured, --mta-head's and --mta-base's trees
    cli.py         options and the interleaved rounds
    targets/       one module per server under test (mta and mta-base, postfix,
                   smtp-sink) and the --e2e receiver

Standard library only; everything talks to 127.0.0.1.
"""
