#!/usr/bin/env python3
"""Files and hops of the requests traced by run.sh (a JSON of [cold, cached] entry lists).

Leaf modules every step may call (keys, verdict, metrics, admission, throttle) are left out of
the path, and validate/* counts as one step (the validator). A hop is a change of file between
two consecutive entries; A>B>A counts the times control came straight back to the file it had
just left. Re-polls of a future count: each wake-up re-enters server > engine > flight.
"""
import json
import sys

LEAVES = {"keys.rs", "verdict.rs", "metrics.rs", "admission.rs", "throttle.rs"}


def step(path):
    name = path.removeprefix("src/")
    if name.startswith("validate/"):
        return "validate/"
    return None if name in LEAVES else name


for path in sys.argv[1:]:
    for label, entries in zip(("cold auth", "cached auth"), json.load(open(path))):
        every = {f.removeprefix("src/") for f, _, _ in entries}
        seq = []
        for f, _, _ in entries:
            s = step(f)
            if s and (not seq or seq[-1] != s):
                seq.append(s)
        back = sum(1 for i in range(2, len(seq)) if seq[i] == seq[i - 2])
        print(f"{path} {label}: {len(every)} library files entered; path: {len(set(seq))} "
              f"files, {len(seq) - 1} hops, {back} A>B>A")
        print("   files:", ", ".join(sorted(every)))
        print("   path: ", " > ".join(seq))
