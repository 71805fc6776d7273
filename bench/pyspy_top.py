#!/usr/bin/env python3
"""Summarise a py-spy raw (collapsed-stack) profile written by ``bench/run.py --py-spy``.

    .venv/bin/python bench/pyspy_top.py bench/profiles/mta-relay-s20-l1024-r0.pyspy.txt [N [THREAD]]

Prints the share of samples per thread, the top N functions by self time, and the
top N functions of the mta package by inclusive time -- of every thread, or of the
threads whose name contains THREAD (e.g. MainThread, writer, PoolThread).  Line
numbers are dropped so one function is one row.  With ``--py-spy-args=--gil`` the
samples are those of the thread holding the GIL: where the Python CPU goes.
"""
from __future__ import annotations

import collections
import re
import sys

_PATH = re.compile(r" \((?:.*?/site-packages/|.*?/lib/python3\.\d+/|.*/(?=mta/))?([^:()]*)(?::\d+)?\)$")


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    only = sys.argv[3] if len(sys.argv) > 3 else None
    self_c: collections.Counter[str] = collections.Counter()
    mta_incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n_s = line.rstrip().rpartition(" ")
            if not stack or not n_s.isdigit():
                continue    # a frame name with a line break in it: the rest of a line
            n = int(n_s)
            frames = stack.split(";")
            if only is not None and only not in frames[0]:
                continue
            total += n
            threads[frames[0]] += n
            names = [_PATH.sub(r" (\1)", fr) for fr in frames[1:]]
            if names:
                self_c[names[-1]] += n
            for name in set(names):
                if "(mta/" in name:
                    mta_incl[name] += n
    if not total:
        sys.exit("no samples")
    print(f"{total} samples")
    for t, n in threads.most_common():
        print(f"{100 * n / total:5.1f}%  {t}")
    print("\nself time")
    for name, n in self_c.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name}")
    print("\nmta functions, inclusive")
    for name, n in mta_incl.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
