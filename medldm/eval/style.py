"""The one stylesheet of medldm's HTML pages (evaluation report, audit report, demo index).

Pages are self-contained: the stylesheet is inlined in ``<head>`` (no scripts, no remote assets). Use
:func:`page_head` to open a page and ``PAGE_END`` to close it::

    parts = [page_head("medldm evaluation report"), "<h1>...</h1>", ..., PAGE_END]
"""

from __future__ import annotations

from html import escape

#: Classes: ``conv`` (the intensity convention), ``best`` (best value of a column), ``flag`` / ``fail`` (red),
#: ``ok`` (green), ``bar`` (the |difference| colour bar of the panels).
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:0.5em 0 1.5em 0;font-size:0.9em}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#eee} tfoot td{background:#f6f6f6}
caption{caption-side:top;text-align:left;font-size:0.9em;padding:4px 0;max-width:1100px}
.conv{font-weight:600;color:#7a2e00} .best{font-weight:700}
.flag{color:#a00;font-weight:700} .ok{color:#060} .fail{color:#a00}
figure{margin:0 0 1.2em 0} figcaption{font-size:0.85em;max-width:1100px} img{max-width:100%}
.bar{display:inline-block;width:120px;height:10px;vertical-align:middle;
 background:linear-gradient(to right,#000 0%,#f00 33%,#ff0 67%,#fff 100%);border:1px solid #888}
code{background:#f3f3f3;padding:0 3px}
"""

PAGE_END = "</body></html>"


def page_head(title: str) -> str:
    """The start of a page: doctype, charset, ``<title>`` (escaped), the stylesheet, and ``<body>``."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>")
