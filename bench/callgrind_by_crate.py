#!/usr/bin/env python3
"""Instructions per request by crate, from a callgrind file (bench/l7_instructions.sh KEEP_CG=DIR).

    python3 bench/callgrind_by_crate.py DIR/cg.one.PID.1 2000

Self cost only: each function's own instructions (after inlining) go to the crate its symbol
names; the costs under `calls=` lines are inclusive and are skipped. libc is split into
memcpy/memmove, malloc/free and the rest.
"""
import collections
import re
import sys


def self_costs(path):
    names, objects = {}, {}
    cost = collections.Counter()
    fn = obj = None
    after_call = False

    def resolve(table, text):
        # Compressed names: "(id) name" the first time, "(id)" after.
        m = re.match(r"\((\d+)\)(?: (.*))?", text)
        if not m:
            return text
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), "?")

    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("ob="):
                obj = resolve(objects, line[3:])
            elif line.startswith("fn="):
                fn = (obj, resolve(names, line[3:]))
            elif line.startswith("cfn="):
                resolve(names, line[4:])
            elif line.startswith("cob="):
                resolve(objects, line[4:])
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in ("+", "-", "*"):
                if after_call:
                    after_call = False
                    continue
                parts = line.split()
                if len(parts) >= 2 and fn:
                    cost[fn] += int(parts[1])
    return cost


def component(obj, fn):
    obj = obj or ""
    if "libc.so" in obj or "ld-linux" in obj:
        if re.search(r"mem(cpy|move)", fn):
            return "libc: memcpy/memmove"
        if re.search(r"malloc|free|_int_|tcache", fn):
            return "libc: malloc/free"
        return "libc: other"
    if "nginx" in obj:
        return "nginx"
    crate = re.split(r"::| |<|>", fn.lstrip("<&*("))[0] or fn[:30]
    return "core/alloc/std" if crate in ("core", "alloc", "std") else crate


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    requests = int(sys.argv[2])
    totals = collections.Counter()
    for (obj, fn), ir in self_costs(sys.argv[1]).items():
        totals[component(obj, fn)] += ir
    total = sum(totals.values())
    print(f"{total // requests:8d}  total per request")
    for name, ir in totals.most_common(20):
        print(f"{ir // requests:8d}  {100 * ir / total:5.1f} %  {name}")


if __name__ == "__main__":
    main()
