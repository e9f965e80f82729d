#!/usr/bin/env python3
"""Turns the JSON reports of run-benchmarks.sh into the tables of docs/benchmarks.md.

usage: summarize.py OUT_DIR    (standard library only)
"""

import json
import pathlib
import re
import sys


def load(out):
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def runs_table(reports):
    print("| run | via | lanes | auth/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | wrong | provider calls (one per login) | broker RSS at end (peak) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in reports.items():
        l = r["latency_us"]
        wrong = "n/a" if r["wrong_verdicts"] is None else r["wrong_verdicts"]
        exp = r["expected_provider_calls"]
        calls = f'{r["provider_calls"]}' + ("" if exp is None else f" ({exp})")
        rss = ", ".join(f'{x["now_kib"] / 1024:.1f} ({x["peak_kib"] / 1024:.1f}) MiB' for x in r["broker_rss"]) or "-"
        print(f'| {name} | {r["scenario"]} via {r["via"]}{" floor" if r["floor"] else ""} | {r["lanes"]} '
              f'| {r["throughput"]:,.0f} | {l["p50"]:.1f} | {l["p90"]:.1f} | {l["p99"]:.1f} | {l["p999"]:.1f} '
              f'| {l["max"]:.0f} | {wrong} | {calls} | {rss} |')


def shim_start_ms(out):
    path = out / "shim-start.txt"
    if not path.exists():
        return None
    m = re.search(r"([\d.]+) \+- [\d.]+ seconds time elapsed", path.read_text())
    return float(m.group(1)) * 1000 if m else None


def targets_table(reports, out):
    def get(name):
        return reports.get(name)

    rows = []

    def row(target, measured, ok, how):
        mark = "n/a" if ok is None else ("met" if ok else "**missed**")
        rows.append(f"| {target} | {measured} | {mark} | {how} |")

    b1, f1 = get("broker-shim-1"), get("floor-shim-1")
    if b1 and f1:
        ratio = b1["latency_us"]["p50"] / f1["latency_us"]["p50"]
        row("cached auth via shim+broker, median <= 2x floor", f'{b1["latency_us"]["p50"]:.1f} / {f1["latency_us"]["p50"]:.1f} µs = {ratio:.2f}x', ratio <= 2, "broker-shim-1 / floor-shim-1")
    b16, f16 = get("broker-shim-16"), get("floor-shim-16")
    if b16 and f16:
        ratio = b16["throughput"] / f16["throughput"]
        row("throughput with 16 shims >= 80% of floor", f'{b16["throughput"]:,.0f} / {f16["throughput"]:,.0f} = {ratio:.0%}', ratio >= 0.8, "broker-shim-16 / floor-shim-16")
    w = get("broker-wire")
    if w:
        row("broker direct >= 150k cached auths/s (2 cores)", f'{w["throughput"]:,.0f} auth/s', w["throughput"] >= 150_000, "broker-wire (harness on the same 2 cores)")
    for seed_name, ours_name in (("seed-16", "broker-shim-16"), ("seed-16-20ms", "broker-shim-16-20ms"),
                                 ("seed-16-50ms", "broker-shim-16-50ms")):
        s, o = get(seed_name), get(ours_name)
        if s and o:
            ratio = o["throughput"] / s["throughput"]
            row(f"hot >= 100x seed-style baseline ({seed_name})", f'{o["throughput"]:,.0f} / {s["throughput"]:,.0f} = {ratio:,.0f}x', ratio >= 100, f"{ours_name} / {seed_name}")
    for herd_name in ("herd-1000-2brokers", "herd-1000-shims-2brokers"):
        h = get(herd_name)
        if h:
            rounds = h["answered"] // h["lanes"]
            per_round = h["provider_calls"] / max(rounds, 1)
            row(f'herd of {h["lanes"]} over 2 brokers -> 1 provider call', f'{h["provider_calls"]} calls / {rounds} rounds = {per_round:.2f} per herd', per_round == 1, herd_name)
    start = shim_start_ms(out)
    row("shim start <= 2 ms", "-" if start is None else f"{start:.2f} ms", None if start is None else start <= 2, "perf stat -r 500 extauth-shim --version")
    if b16 and b16["program_peak_rss_kib"]:
        rss = b16["program_peak_rss_kib"] / 1024
        row("shim RSS <= 3 MB", f"{rss:.2f} MiB", b16["program_peak_rss_kib"] * 1024 <= 3_000_000, "largest VmHWM of 16 shims, broker-shim-16")
    m = get("rss-1m")
    if m and m["broker_rss"]:
        rss = m["broker_rss"][0]
        row("broker RSS with 1M cached verdicts <= 64 MB", f'{rss["now_kib"] / 1024:.1f} MiB (peak {rss["peak_kib"] / 1024:.1f} MiB)',
            rss["now_kib"] * 1024 <= 64_000_000, "VmRSS after cold 1M via wire (VmHWM in brackets)")
    print("| target | measured | | how |")
    print("|---|---|---|---|")
    print("\n".join(rows))


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/benchmarks")
    reports = load(out)
    machine = out / "machine.txt"
    if machine.exists():
        print("machine: " + " | ".join(machine.read_text().split("\n")).strip(" |") + "\n")
    runs_table(reports)
    print()
    targets_table(reports, out)


if __name__ == "__main__":
    main()
