"""tegrastats lines: parse into a Snapshot and render from one (a real r36 line round-trips)."""

from __future__ import annotations

import re

from ...errors import PlatformError
from .snapshot import OFFLINE_MC, CpuCore, Rail, Snapshot

_HEAD = re.compile(
    r"^(?P<stamp>\d\d-\d\d-\d{4} \d\d:\d\d:\d\d) "
    r"RAM (?P<ru>\d+)/(?P<rt>\d+)MB(?: \(lfb (?P<lfbn>\d+)x(?P<lfbs>\d+)MB\))? "
    r"SWAP (?P<su>\d+)/(?P<st>\d+)MB \(cached (?P<sc>\d+)MB\) "
    r"CPU \[(?P<cpu>[^\]]*)\]"
)
_CORE = re.compile(r"^(\d+)%@(\d+)$")
_EMC = re.compile(r"^(\d+)%@(\d+)$")
_GR3D = re.compile(r"^(\d+)%@(?:\[([\d,]*)\]|(\d+))$")
_TEMP = re.compile(r"^([A-Za-z0-9_]+)@(-?\d+(?:\.\d+)?)C$")
_RAIL = re.compile(r"^(\d+)mW/(\d+)mW$")


def parse_line(line: str) -> Snapshot:
    """A tegrastats line (r35/r36 format) as a Snapshot; raises PlatformError naming what did not parse."""
    line = line.strip()
    m = _HEAD.match(line)
    if not m:
        raise PlatformError(f"not a tegrastats line: {line[:80]!r}", hint="expected 'MM-DD-YYYY HH:MM:SS RAM u/tMB ... CPU [...]'")
    s = Snapshot(stamp=m["stamp"], ram_used_mb=int(m["ru"]), ram_total_mb=int(m["rt"]),
                 swap_used_mb=int(m["su"]), swap_total_mb=int(m["st"]), swap_cached_mb=int(m["sc"]))
    if m["lfbn"]:
        s.lfb_blocks, s.lfb_block_mb = int(m["lfbn"]), int(m["lfbs"])
    for item in m["cpu"].split(","):
        if item == "off":
            s.cpus.append(CpuCore(online=False))
        elif cm := _CORE.match(item):
            s.cpus.append(CpuCore(online=True, load_pct=int(cm[1]), mhz=int(cm[2])))
        else:
            raise PlatformError(f"tegrastats CPU entry {item!r} is neither 'N%@MHz' nor 'off'")
    tokens = line[m.end():].split()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok == "EMC_FREQ" and nxt and (em := _EMC.match(nxt)):
            s.emc_load_pct, s.emc_mhz = int(em[1]), int(em[2])
            i += 2
        elif tok == "GR3D_FREQ" and nxt and (gm := _GR3D.match(nxt)):
            s.gpu_load_pct = int(gm[1])
            s.gpu_mhz_bracketed = gm[2] is not None
            s.gpu_mhz = [int(v) for v in gm[2].split(",") if v] if gm[2] is not None else [int(gm[3])]
            i += 2
        elif tm := _TEMP.match(tok):
            s.temps_mc[tm[1]] = round(float(tm[2]) * 1000)
            i += 1
        elif nxt and (rm := _RAIL.match(nxt)):
            s.rails[tok] = Rail(mw=int(rm[1]), avg_mw=int(rm[2]))
            i += 2
        elif nxt is not None and re.match(r"^(off|\d+%@\d+|\d+)$", nxt):
            s.engines[tok] = nxt
            i += 2
        else:
            raise PlatformError(f"unexpected tegrastats field {tok!r} in {line[:60]!r}...")
    return s


def render_line(s: Snapshot) -> str:
    """The tegrastats line of a Snapshot (offline sensors are left out, as tegrastats does)."""
    out = [s.stamp, f"RAM {s.ram_used_mb}/{s.ram_total_mb}MB"]
    if s.lfb_blocks is not None:
        out[-1] += f" (lfb {s.lfb_blocks}x{s.lfb_block_mb}MB)"
    out.append(f"SWAP {s.swap_used_mb}/{s.swap_total_mb}MB (cached {s.swap_cached_mb}MB)")
    out.append("CPU [" + ",".join(f"{c.load_pct}%@{c.mhz}" if c.online else "off" for c in s.cpus) + "]")
    if s.emc_load_pct is not None:
        out.append(f"EMC_FREQ {s.emc_load_pct}%@{s.emc_mhz}")
    if s.gpu_load_pct is not None:
        freq = "[" + ",".join(map(str, s.gpu_mhz)) + "]" if s.gpu_mhz_bracketed else str(s.gpu_mhz[0] if s.gpu_mhz else 0)
        out.append(f"GR3D_FREQ {s.gpu_load_pct}%@{freq}")
    out += [f"{k} {v}" for k, v in s.engines.items()]
    out += [f"{k}@{v / 1000:.3f}C" for k, v in s.temps_mc.items() if v > OFFLINE_MC]
    out += [f"{k} {r.mw}mW/{r.avg_mw}mW" for k, r in s.rails.items()]
    return " ".join(out)
