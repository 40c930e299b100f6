"""``pipeline trace FILE``: a trace written by ``--trace`` (NOTE [ Trace ] in trace.py) read back: each
lane's busy share and the events, as text; ``--plot out.png`` draws the timeline (matplotlib): a row per
thread or worker lane, a colour per stage, instant events (deaths, retries, restarts) as markers, and the
counters (slots in use, batches in flight) below."""
from __future__ import annotations

from .errors import ConfigError
from .trace import read

PLOT_EXTRA = "pipeline trace --plot needs matplotlib: pip install -e '.[plot]'"
COLOURS = {"start-up": "#dddddd", "build": "#4c72b0", "dispatch": "#8172b2", "stage": "#937860", "h2d": "#dd8452", "h2d wait": "#dd8452",
           "decode": "#da8bc3", "compute": "#55a868", "d2h": "#c44e52", "return": "#8c8c8c", "write": "#ccb974"}
MARKS = {"worker died": ("X", "#d62728"), "actor lost": ("X", "#d62728"), "build process died": ("X", "#d62728"),
         "retry": ("o", "#ff7f0e"), "worker started": ("^", "#2ca02c"), "quarantined": ("s", "#000000"),
         "split": ("d", "#9467bd")}


class Trace:
    """The events of a trace file, grouped: lanes of spans, instants, counters, names."""

    def __init__(self, path: str):
        try:
            doc = read(path)
        except FileNotFoundError:
            raise ConfigError(f"trace {path}: no such file (write one with pipeline run --trace {path})") from None
        except ValueError as e:
            raise ConfigError(f"trace {path}: not a JSON trace ({e})") from None
        self.path, self.other = path, doc.get("otherData") or {}
        self.procs: dict = {}
        self.threads: dict = {}
        self.spans: dict = {}  # (pid, tid) -> [(start_s, dur_s, cat)]
        self.instants: list = []  # (t_s, name, pid, tid, args)
        self.counters: list = []  # (t_s, {name: value})
        for e in doc.get("traceEvents", []):
            ph, pid = e.get("ph"), e.get("pid")
            if ph == "M" and e["name"] == "process_name":
                self.procs[pid] = e["args"].get("name")
            elif ph == "M" and e["name"] == "thread_name":
                self.threads[(pid, e.get("tid"))] = e["args"].get("name")
            elif ph == "X":
                self.spans.setdefault((pid, e["tid"]), []).append((e["ts"] / 1e6, e["dur"] / 1e6, e.get("cat", "")))
            elif ph == "i":
                self.instants.append((e["ts"] / 1e6, e.get("cat", e["name"]), pid, e.get("tid"), e.get("args", {})))
            elif ph == "C":
                self.counters.append((e["ts"] / 1e6, e.get("args", {})))
        for _, _, pid, tid, _ in self.instants:  # (a worker with no span yet gets its row; names may come last)
            if pid in self.procs and self.procs[pid] != "main":
                self.spans.setdefault((pid, tid), [])
        if not self.spans and not self.instants:
            raise ConfigError(f"trace {path}: no spans or events in it")
        ends = [s + d for lane in self.spans.values() for s, d, _ in lane] + [t for t, *_ in self.instants]
        starts = [s for lane in self.spans.values() for s, _, _ in lane] + [t for t, *_ in self.instants]
        self.t0, self.t1 = min(starts), max(ends)

    def lane_name(self, key) -> str:
        pid, tid = key
        return f"{self.procs.get(pid, f'pid {pid}')}: {self.threads.get(key, tid)}"

    def lanes(self) -> list:
        """Lanes in display order: the main's first, then build processes, workers and actors by name."""
        def order(key):
            proc = self.procs.get(key[0], "")
            return (0 if proc == "main" else 1 if proc.startswith("build") else 2, proc, str(self.threads.get(key)))
        return sorted(self.spans, key=order)

    def text(self) -> str:
        wall = max(self.t1 - self.t0, 1e-9)
        lines = [f"trace        {self.path}: {wall:.3f} s, {sum(map(len, self.spans.values()))} spans, "
                 f"{len(self.instants)} events" + (f", {self.other['dropped_events']} dropped"
                                                    if self.other.get("dropped_events") else "")]
        for key in self.lanes():
            by: dict = {}
            for _, d, cat in self.spans[key]:
                by[cat] = by.get(cat, 0.0) + d
            busy = sum(by.values()) / wall
            parts = ", ".join(f"{c} {v / wall:.0%}" for c, v in sorted(by.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {self.lane_name(key):44} busy {busy:5.0%}  ({parts})")
        for t, name, pid, _, args in sorted(self.instants)[:40]:
            what = ", ".join(f"{k} {v}" for k, v in args.items())
            lines.append(f"  {t - self.t0:8.3f} s  {name:18} {self.procs.get(pid, f'pid {pid}')}  {what}")
        if len(self.instants) > 40:
            lines.append(f"  ... {len(self.instants) - 40} more events")
        v = self.other.get("bottleneck")
        if v:
            from .verdict import line
            lines.append(f"bottleneck   {line(v)}")
        return "\n".join(lines)


def draw(path: str, out: str) -> str:
    """The timeline of trace ``path`` as a PNG at ``out``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise ConfigError(PLOT_EXTRA) from None
    tr = Trace(path)
    lanes = tr.lanes()
    rows = {key: i for i, key in enumerate(lanes)}
    fig, (ax, cx) = plt.subplots(2, 1, figsize=(12, 1.2 + 0.32 * len(lanes) + 1.6), sharex=True,
                                 gridspec_kw={"height_ratios": [max(2, 0.32 * len(lanes)), 1.4]})
    seen = set()
    for key, spans in tr.spans.items():
        by: dict = {}
        for s, d, cat in spans:
            by.setdefault(cat, []).append((s - tr.t0, max(d, (tr.t1 - tr.t0) / 4000)))
        for cat, bars in by.items():
            ax.broken_barh(bars, (rows[key] - 0.4, 0.8), facecolors=COLOURS.get(cat, "#999999"))
            seen.add(cat)
    for t, name, pid, tid, _ in tr.instants:
        key = (pid, tid) if (pid, tid) in rows else next((k for k in lanes if k[0] == pid), None)
        marker, colour = MARKS.get(name, ("|", "#333333"))
        y = rows[key] if key is not None else -0.8
        ax.plot([t - tr.t0], [y], marker=marker, color=colour, markersize=9, linestyle="none",
                markeredgecolor="black", zorder=5)
        if name in ("worker died", "actor lost", "retry"):
            ax.annotate(name, (t - tr.t0, y), xytext=(4, 6), textcoords="offset points", fontsize=7)
    ax.set_yticks(range(len(lanes)), [tr.lane_name(k) for k in lanes], fontsize=7)
    ax.set_ylim(len(lanes) - 0.4, -1.2)
    ax.legend(handles=[Patch(color=COLOURS.get(c, "#999999"), label=c) for c in sorted(seen)], fontsize=7,
              loc="upper right", ncol=min(6, len(seen)))
    what = tr.other.get("kernel") or ""
    ax.set_title(f"pipeline trace {what}: {tr.t1 - tr.t0:.2f} s", fontsize=9)
    names = sorted({k for _, c in tr.counters for k in c if "RSS" not in k})
    for name in names:
        pts = [(t - tr.t0, c[name]) for t, c in tr.counters if name in c]
        if pts:
            cx.step(*zip(*pts), where="post", label=name)
    cx.set_xlabel("seconds")
    cx.set_ylabel("count", fontsize=8)
    if names:
        cx.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
