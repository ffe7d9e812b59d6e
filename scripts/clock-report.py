#!/usr/bin/env python3
"""Tables and the offset plot for scripts/bench-clock.sh (Python 3, standard library only).

  clock-report.py table MANIFEST          markdown rows from chronyd measurements logs
  clock-report.py svg MANIFEST OUT.svg    offset over time, one line per path
  clock-report.py ntpdig FILE...          one markdown row per ntpdate/sntp output set

MANIFEST has one path per line, tab-separated: label, measurements.log, first line, last line
(the 1-based line numbers of the log that fall inside the measurement window; "-" for a path
that was not run, and then the fifth field says why), plot flag (1: draw it in the SVG).

chronyd's measurements log (chrony.conf(5), "log measurements"): column 12 is the offset theta
of RFC 5905 (positive: the source is ahead of the local clock), 13 the peer delay, 18 the NTP
mode of the reply with B (basic) or I (interleaved). Every process here reads one clock, so the
true offset is 0 and what chronyd reports is the error the path puts into the client's clock.
"""

import datetime
import math
import re
import sys

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def samples(path, first, last):
    """(UTC seconds since the epoch, offset s, delay s, interleaved) per window line."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return out
    for n, line in enumerate(lines, start=1):
        if n < first or n > last or not LINE.match(line):
            continue
        t = line.split()
        if len(t) < 18:
            continue
        try:
            when = datetime.datetime.strptime(f"{t[0]} {t[1]}", "%Y-%m-%d %H:%M:%S")
            offset, delay = float(t[11]), float(t[12])
        except ValueError:
            continue
        secs = when.replace(tzinfo=datetime.timezone.utc).timestamp()
        out.append((secs, offset, delay, t[17].endswith("I")))
    return out


def manifest(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            parts += [""] * (6 - len(parts))
            label, log, first, last, why, plot = parts[:6]
            rows.append((label, log, first, last, why, plot == "1"))
    return rows


def us(x, signed=False):
    if x is None:
        return "-"
    return f"{x * 1e6:+.1f} us" if signed else f"{x * 1e6:.1f} us"


def stats(s):
    offs = [o for _, o, _, _ in s]
    return {
        "n": len(s),
        "off50": percentile(offs, 50),
        "abs90": percentile([abs(o) for o in offs], 90),
        "del50": percentile([d for _, _, d, _ in s], 50),
        "ileave": (100.0 * sum(1 for x in s if x[3]) / len(s)) if s else None,
    }


def table(path):
    print("| path | samples | offset p50 | abs(offset) p90 | delay p50 | interleaved |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, log, first, last, why, _ in manifest(path):
        if first == "-":
            print(f"| {label} | {why} | | | | |")
            continue
        st = stats(samples(log, int(first), int(last)))
        il = "-" if st["ileave"] is None else f"{st['ileave']:.0f}%"
        print(
            f"| {label} | {st['n']} | {us(st['off50'], True)} | {us(st['abs90'])} "
            f"| {us(st['del50'])} | {il} |"
        )
    # Machine-readable lines for the script's target checks (stderr keeps stdout a report).
    for label, log, first, last, _, _ in manifest(path):
        if first == "-":
            continue
        st = stats(samples(log, int(first), int(last)))
        fields = " ".join(
            f"{k}={'-' if v is None else (f'{v:.6e}' if isinstance(v, float) else v)}"
            for k, v in st.items()
        )
        print(f"STATS label={label.replace(' ', '_')} {fields}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
COLOURS = ["#1b6ac9", "#d1495b", "#edae49", "#2e8b57", "#7b3fa0", "#555555", "#00a6a6"]


def nice_step(span, target=6):
    raw = span / target if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def symlog(v):
    """The y scale: linear within +-1 us, logarithmic beyond (1 us, 10 us, 100 us... equally
    spaced), so a path at a few us and one at ten ms are both readable on one plot."""
    return math.copysign(math.log10(1.0 + abs(v)), v)


def svg(path, out, title):
    series = []
    for label, log, first, last, _, plot in manifest(path):
        if not plot or first == "-":
            continue
        s = samples(log, int(first), int(last))
        if s:
            series.append((label, s))
    t0 = min((x[0] for _, s in series for x in s), default=0.0)
    series = [(label, [(t - t0, o * 1e6) for t, o, _, _ in s]) for label, s in series]
    w, h = 960, 600
    ml, mr, mt, mb = 90, 20, 50, 70 + 20 * len(series)
    pw, ph = w - ml - mr, h - mt - mb
    xs = [t for _, pts in series for t, _ in pts] or [1.0]
    ys = [abs(o) for _, pts in series for _, o in pts] or [1.0]
    decades = max(1, math.ceil(math.log10(max(max(ys), 1.0))))
    y1 = symlog(10.0**decades)
    y0 = -y1
    x0, x1 = 0.0, max(max(xs), 1.0)
    xstep = nice_step(x1)
    x1 = math.ceil(x1 / xstep) * xstep

    def px(x):
        return ml + (x - x0) / (x1 - x0) * pw

    def py(v):
        return mt + (y1 - symlog(v)) / (y1 - y0) * ph

    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">{esc(title)}</text>',
    ]
    ticks = [0.0] + [s * 10.0**k for k in range(decades + 1) for s in (1, -1)]
    for v in ticks:
        if abs(symlog(v)) > y1 + 1e-9:
            continue
        o.append(
            f'<line x1="{ml}" x2="{ml + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
            f'stroke="{"#888" if v == 0 else "#e0e0e0"}"/>'
        )
        text = "0" if v == 0 else f"{v:+,.0f}"
        o.append(f'<text x="{ml - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{text}</text>')
    x = 0.0
    while x <= x1 + 1e-9:
        o.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{mt}" y2="{mt + ph}" stroke="#e0e0e0"/>'
        )
        o.append(f'<text x="{px(x):.1f}" y="{mt + ph + 18}" text-anchor="middle">{x:g}</text>')
        x += xstep
    o.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    o.append(
        f'<text x="{ml + pw / 2}" y="{mt + ph + 40}" text-anchor="middle">'
        "time since the window opened (s)</text>"
    )
    o.append(
        f'<text transform="translate(20 {mt + ph / 2}) rotate(-90)" text-anchor="middle">'
        "offset chronyd measured (us, truth 0; log scale beyond +-1 us)</text>"
    )
    for i, (label, pts) in enumerate(series):
        c = COLOURS[i % len(COLOURS)]
        poly = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in pts)
        o.append(
            f'<polyline points="{poly}" fill="none" stroke="{c}" stroke-width="1.3" '
            'stroke-opacity="0.8"/>'
        )
        for t, v in pts:
            o.append(f'<circle cx="{px(t):.1f}" cy="{py(v):.1f}" r="1.8" fill="{c}"/>')
    for i, (label, pts) in enumerate(series):
        c = COLOURS[i % len(COLOURS)]
        ly = mt + ph + 66 + i * 20
        offs = [v for _, v in pts]
        med = percentile(offs, 50)
        p90 = percentile([abs(v) for v in offs], 90)
        o.append(
            f'<line x1="{ml}" x2="{ml + 24}" y1="{ly - 4}" y2="{ly - 4}" stroke="{c}" '
            'stroke-width="3"/>'
        )
        o.append(
            f'<text x="{ml + 30}" y="{ly}">{esc(label)}: offset p50 {med:+.1f} us, '
            f"abs(offset) p90 {p90:.1f} us, {len(pts)} samples</text>"
        )
    o.append("</svg>")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(o) + "\n")


# ---------------------------------------------------------------------------------------------
REPORT = re.compile(r"\s([+-]\d+\.\d+) \+/- (\d+\.\d+)\s")
STAMP = re.compile(r"\b(t[1-4]):\s*([0-9a-f]{8})\.([0-9a-f]{8})")


def ntpdig(files):
    """Each file: the outputs of several `ntpdate -q -d` or `sntp -d` runs, separated by
    lines '=== run'. Prints offset and delay (from t1..t4) median and range over the runs."""
    for fn in files:
        with open(fn, encoding="utf-8", errors="replace") as f:
            text = f.read()
        label = fn.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        offs, dels, failed = [], [], 0
        for run in text.split("=== run")[1:]:
            m = REPORT.search(run)
            if not m:
                failed += 1
                continue
            offs.append(float(m.group(1)))
            ts = {}
            for k, a, b in STAMP.findall(run):
                ts[k] = int(a, 16) + int(b, 16) / 2**32
            if len(ts) == 4:
                dels.append((ts["t4"] - ts["t1"]) - (ts["t3"] - ts["t2"]))

        def cell(v, signed):
            if not v:
                return "-"
            return f"{us(percentile(v, 50), signed)} ({us(min(v), signed)} .. {us(max(v), signed)})"

        print(
            f"| {label} | {len(offs)}{f' ({failed} failed)' if failed else ''} "
            f"| {cell(offs, True)} | {cell(dels, False)} |"
        )


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "svg":
        svg(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "offset")
    elif len(sys.argv) >= 3 and sys.argv[1] == "ntpdig":
        ntpdig(sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
