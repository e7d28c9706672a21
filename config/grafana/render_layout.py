#!/usr/bin/env python3
"""Renders config/grafana/pgrst-guard.dashboard.json as a picture of its layout (docs/dashboard.svg):
each panel where Grafana puts it, with its title, its kind and the queries it plots. Run it after
changing the dashboard:  python3 config/grafana/render_layout.py"""
import html
import json
import pathlib

root = pathlib.Path(__file__).resolve().parents[2]
dashboard = json.loads((root / "config/grafana/pgrst-guard.dashboard.json").read_text())
unit_w, unit_h, pad = 44, 30, 6
width = 24 * unit_w + 2 * pad
height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"]) * unit_h + 2 * pad + 40
out = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
    f'<rect width="{width}" height="{height}" fill="#111217"/>',
    f'<text x="{pad + 4}" y="26" fill="#d8d9da" font-size="18">{html.escape(dashboard["title"])} (Grafana dashboard layout)</text>',
]
for panel in dashboard["panels"]:
    g = panel["gridPos"]
    x, y = pad + g["x"] * unit_w, 40 + pad + g["y"] * unit_h
    w, h = g["w"] * unit_w - 4, g["h"] * unit_h - 4
    if panel["type"] == "row":
        out.append(f'<text x="{x + 4}" y="{y + 20}" fill="#8e8e8e" font-size="15" font-weight="bold">{html.escape(panel["title"])}</text>')
        continue
    out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="#181b1f" stroke="#2c3235"/>')
    out.append(f'<text x="{x + 8}" y="{y + 18}" fill="#d8d9da" font-size="13">{html.escape(panel["title"])}</text>')
    out.append(f'<text x="{x + w - 8}" y="{y + 18}" fill="#6e9fff" font-size="11" text-anchor="end">{panel["type"]}</text>')
    for i, target in enumerate(panel.get("targets", [])[: max(1, (h - 30) // 14)]):
        expr = " ".join(target.get("expr", "").split())
        limit = max(20, w // 6)
        expr = expr if len(expr) <= limit else expr[: limit - 1] + "…"
        out.append(f'<text x="{x + 8}" y="{y + 38 + 14 * i}" fill="#9fa7b3" font-size="10" font-family="monospace">{html.escape(expr)}</text>')
out.append("</svg>")
(root / "docs/dashboard.svg").write_text("\n".join(out) + "\n")
print("wrote docs/dashboard.svg")
