"""The demo's results as a picture: latency and requests/s over time, restarts marked.

Hand-written SVG (no dependency); a PNG only when matplotlib happens to be
installed, otherwise the SVG is written next to the requested .png name.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

if TYPE_CHECKING:
    from octoproxy.demo_results import Results

WINDOW_S = 0.1
P50_COLOR = "#1f77b4"
P99_COLOR = "#d62728"
RPS_COLOR = "#2ca02c"
RESTART_COLOR = "#ff7f0e"


def write_chart(res: Results, path: str) -> str:
    """Write the chart to `path`; returns a line saying what was written."""
    if path.lower().endswith(".png"):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            svg_path = path[:-4] + ".svg"
            _write(svg_path, svg(res))
            return (f"chart: matplotlib is not installed, so no PNG; wrote the SVG "
                    f"{svg_path} instead")
        _png(res, path)
        return f"chart: wrote {path}"
    _write(path, svg(res))
    return f"chart: wrote {path}"


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _nice_step(span: float, target: int) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt_ms(v: float) -> str:
    return f"{v:g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    out = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo * 0.9999 <= v <= hi * 1.0001:
                out.append(round(v, 6))
        e += 1
    return out


def svg(res: Results) -> str:
    from octoproxy.demo_results import windows

    win = windows(res, WINDOW_S)
    dur = max(res.duration, WINDOW_S)
    W, H = 960, 620
    left, right = 84, 24
    lat_top, lat_bot = 96, 380
    rps_top, rps_bot = 420, 560
    pw = W - left - right

    def x(t: float) -> float:
        return left + pw * min(max(t / dur, 0.0), 1.0)

    vals = [v for _, p50, p99, _ in win for v in (p50, p99) if not math.isnan(v) and v > 0]
    lo = 10 ** math.floor(math.log10(min(vals))) if vals else 0.1
    hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 10.0
    if hi <= lo:
        hi = lo * 10

    def ylat(v: float) -> float:
        f = (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        return lat_bot - (lat_bot - lat_top) * min(max(f, 0.0), 1.0)

    rmax_raw = max([r for *_, r in win] + [1.0])
    rstep = _nice_step(rmax_raw, 4)
    rmax = math.ceil(rmax_raw / rstep) * rstep

    def yrps(v: float) -> float:
        return rps_bot - (rps_bot - rps_top) * (v / rmax)

    o: list[str] = []
    a = o.append
    a(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
      f'viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
      f'font-size="12">')
    a(f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>')
    title = (f"octo-proxy demo: {res.requests:,} requests in {res.duration:.1f} s, "
             f"{len(res.restarts)} hot restart{'' if len(res.restarts) == 1 else 's'}, "
             f"{res.failed} failed")
    a(f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16" '
      f'font-weight="bold">{escape(title)}</text>')

    # restart windows: SIGUSR2 -> the old generation has exited; line at the signal
    for i, e in enumerate(res.restarts):
        x0 = x(e.t_signal)
        x1 = x(e.t_old_gone if not math.isnan(e.t_old_gone) else res.duration)
        for top, bot in ((lat_top, lat_bot), (rps_top, rps_bot)):
            a(f'<rect x="{x0:.1f}" y="{top}" width="{max(1.0, x1 - x0):.1f}" '
              f'height="{bot - top}" fill="{RESTART_COLOR}" fill-opacity="0.12"/>')
            a(f'<line x1="{x0:.1f}" y1="{top}" x2="{x0:.1f}" y2="{bot}" '
              f'stroke="{RESTART_COLOR}" stroke-width="2" stroke-dasharray="6,4"/>')
            if not math.isnan(e.t_serving):
                xs = x(e.t_serving)
                a(f'<line x1="{xs:.1f}" y1="{top}" x2="{xs:.1f}" y2="{bot}" '
                  f'stroke="{RESTART_COLOR}" stroke-width="1" stroke-dasharray="2,3"/>')
        label = f"{e.which} hot restart (pid {e.old_pid} \u2192 {e.new_pid})"
        a(f'<text x="{x0 + 4:.1f}" y="{lat_top - 8 - 16 * (len(res.restarts) - 1 - i)}" '
          f'fill="#b35900" font-size="12">\u25bc {escape(label)}</text>')

    # latency panel
    a(f'<rect x="{left}" y="{lat_top}" width="{pw}" height="{lat_bot - lat_top}" '
      f'fill="none" stroke="#444"/>')
    for v in _log_ticks(lo, hi):
        yy = ylat(v)
        a(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#ddd"/>')
        a(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{_fmt_ms(v)}</text>')
    a(f'<text transform="translate(20,{(lat_top + lat_bot) / 2}) rotate(-90)" '
      f'text-anchor="middle">latency, ms (log scale)</text>')

    def polyline(points: list[tuple[float, float]], color: str, width: float) -> None:
        if len(points) == 1:
            px, py = points[0]
            a(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2" fill="{color}"/>')
        elif points:
            pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            a(f'<polyline points="{pts}" fill="none" stroke="{color}" '
              f'stroke-width="{width}" stroke-linejoin="round"/>')

    for idx, color in ((2, P99_COLOR), (1, P50_COLOR)):
        run: list[tuple[float, float]] = []
        for w in win:
            v = w[idx]
            if math.isnan(v) or v <= 0:
                polyline(run, color, 2)
                run = []
                continue
            run.append((x(w[0] + WINDOW_S / 2), ylat(v)))
        polyline(run, color, 2)
    for t, _ in res.failures:
        xx = x(t)
        a(f'<text x="{xx:.1f}" y="{lat_bot - 4}" text-anchor="middle" fill="red" '
          f'font-weight="bold">\u00d7</text>')

    # legend
    items = [(P50_COLOR, "p50 per 100 ms window", "line"),
             (P99_COLOR, "p99 per 100 ms window", "line"),
             (RESTART_COLOR, "SIGUSR2 \u2192 old generation exited", "band"),
             (RESTART_COLOR, "new generation serving", "dotted")]
    if res.failures:
        items.append(("red", "failed request", "x"))
    lx, ly = left + pw - 262, lat_top + 10
    a(f'<rect x="{lx}" y="{ly}" width="252" height="{18 * len(items) + 4}" '
      f'fill="white" fill-opacity="0.9" stroke="#999"/>')
    for k, (color, text, kind) in enumerate(items):
        yy = ly + 18 + 18 * k
        if kind == "line":
            a(f'<line x1="{lx + 10}" y1="{yy - 4}" x2="{lx + 36}" y2="{yy - 4}" '
              f'stroke="{color}" stroke-width="2"/>')
        elif kind == "dotted":
            a(f'<line x1="{lx + 10}" y1="{yy - 4}" x2="{lx + 36}" y2="{yy - 4}" '
              f'stroke="{color}" stroke-width="1.5" stroke-dasharray="2,3"/>')
        elif kind == "band":
            a(f'<rect x="{lx + 10}" y="{yy - 11}" width="26" height="13" fill="{color}" '
              f'fill-opacity="0.2" stroke="{color}" stroke-dasharray="4,3"/>')
        else:
            a(f'<text x="{lx + 23}" y="{yy}" text-anchor="middle" fill="red" '
              f'font-weight="bold">\u00d7</text>')
        a(f'<text x="{lx + 44}" y="{yy}">{escape(text)}</text>')

    # requests/s panel
    a(f'<rect x="{left}" y="{rps_top}" width="{pw}" height="{rps_bot - rps_top}" '
      f'fill="none" stroke="#444"/>')
    v = 0.0
    while v <= rmax + 1e-9:
        yy = yrps(v)
        a(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#ddd"/>')
        a(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
        v += rstep
    a(f'<text transform="translate(20,{(rps_top + rps_bot) / 2}) rotate(-90)" '
      f'text-anchor="middle">requests/s</text>')
    pts = [(x(0), yrps(0))]
    for t0, _, _, r in win:
        pts += [(x(t0), yrps(r)), (x(min(t0 + WINDOW_S, dur)), yrps(r))]
    pts.append((x(dur), yrps(0)))
    a('<polygon points="' + " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
      + f'" fill="{RPS_COLOR}" fill-opacity="0.25" stroke="{RPS_COLOR}" stroke-width="1.5"/>')
    a(f'<text x="{left + 8}" y="{rps_top + 16}" fill="#1a6b1a">answered requests/s '
      f'per 100 ms window</text>')

    # time axis
    step = _nice_step(dur, 10)
    t = 0.0
    while t <= dur + 1e-9:
        xx = x(t)
        for bot in (lat_bot, rps_bot):
            a(f'<line x1="{xx:.1f}" y1="{bot}" x2="{xx:.1f}" y2="{bot + 5}" stroke="#444"/>')
        a(f'<text x="{xx:.1f}" y="{rps_bot + 20}" text-anchor="middle">{t:g}</text>')
        t += step
    a(f'<text x="{left + pw / 2}" y="{rps_bot + 44}" text-anchor="middle">'
      f'time since traffic started, s</text>')
    a("</svg>")
    return "\n".join(o) + "\n"


def _png(res: Results, path: str) -> None:  # pragma: no cover  (needs matplotlib)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from octoproxy.demo_results import windows

    win = windows(res, WINDOW_S)
    ts = [w[0] + WINDOW_S / 2 for w in win]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                  gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(ts, [w[1] for w in win], color=P50_COLOR, label="p50 per 100 ms window")
    ax.plot(ts, [w[2] for w in win], color=P99_COLOR, label="p99 per 100 ms window")
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log scale)")
    ax2.fill_between([w[0] for w in win], [w[3] for w in win], step="post", color=RPS_COLOR,
                     alpha=0.3)
    ax2.set_ylabel("requests/s")
    ax2.set_xlabel("time since traffic started, s")
    for i, e in enumerate(res.restarts):
        end = e.t_old_gone if not math.isnan(e.t_old_gone) else res.duration
        for a in (ax, ax2):
            a.axvspan(e.t_signal, end, color=RESTART_COLOR, alpha=0.12,
                      label="SIGUSR2 \u2192 old generation exited" if a is ax and i == 0 else None)
            a.axvline(e.t_signal, color=RESTART_COLOR, linestyle="--")
        ax.annotate(f"{e.which} hot restart", (e.t_signal, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12 - 12 * i), textcoords="offset points", color="#b35900")
    ax.legend(loc="upper right")
    fig.suptitle(f"octo-proxy demo: {res.requests:,} requests in {res.duration:.1f} s, "
                 f"{len(res.restarts)} hot restarts, {res.failed} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
