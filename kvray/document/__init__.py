"""The report's page model: blocks (headings, paragraphs, tables, figures) rendered twice — Markdown and a
self-contained HTML — so both always say the same thing; the table cells and figure blocks several sections share.

Used by the report (kvray/report/), each experiment's section (kvray/experiments/) and ``kvray compare``.
"""

from kvray.document.blocks import Block, FigureBlocks, cell_table
from kvray.document.render import render_html, render_markdown

__all__ = ["Block", "FigureBlocks", "cell_table", "render_html", "render_markdown"]
