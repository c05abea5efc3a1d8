"""A small, dependency-free HTML report: sections of paragraphs, notes, tables and pictures.

Pictures are embedded as base64 data URIs, so ``report.html`` is one self-contained file that opens in any
browser (and can be mailed or archived); the PNG files it was built from stay next to it.

    rep = HtmlReport("dagman demo", subtitle="tiny CPU budgets")
    sec = rep.section("Nodule malignancy")
    sec.paragraph("...")
    sec.table(["encoder", "AUC"], [["dagman", "0.71 [0.62, 0.80]"]], caption="3-fold CV")
    sec.image("roc.png", "ROC curves")
    rep.write("report.html")
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.1em} .subtitle{color:#555;margin-top:0}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:bottom;color:#555;font-size:.9em;text-align:left;padding-top:.3em}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{color:#555;font-size:.9em}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.5em .8em;margin:.8em 0}
.missing{background:#fdecea;border-left:4px solid #c0392b;padding:.5em .8em}
code,pre{background:#f6f6f6;padding:.1em .3em;font-size:.9em} pre{padding:.6em;overflow-x:auto}
nav ol{columns:2}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class Section:
    """One ``<h2>`` section; add blocks in order."""

    title: str
    blocks: list[str] = field(default_factory=list)
    base: Path | None = None

    def paragraph(self, text: str) -> "Section":
        self.blocks.append(f"<p>{_esc(text)}</p>")
        return self

    def note(self, text: str) -> "Section":
        """A highlighted caveat (budgets, synthetic data, ...)."""
        self.blocks.append(f'<div class="note">{_esc(text)}</div>')
        return self

    def missing(self, text: str) -> "Section":
        """Say plainly that a part did not run, and why."""
        self.blocks.append(f'<div class="missing">{_esc(text)}</div>')
        return self

    def code(self, text: str) -> "Section":
        self.blocks.append(f"<pre><code>{_esc(text)}</code></pre>")
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> "Section":
        """Cells are escaped; numbers (int/float) are right-aligned, floats shown with 3 decimals."""
        head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
        body = []
        for row in rows:
            cells = []
            for v in row:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    cells.append(f"<td>{_esc(v)}</td>")
                else:
                    cells.append(f'<td class="num">{_esc(f"{v:.3f}" if isinstance(v, float) else v)}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
        self.blocks.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        return self

    def image(self, path: str | os.PathLike, caption: str | None = None, width: int | None = None) -> "Section":
        """Embed a PNG (base64). A missing file becomes a visible 'missing picture' block, not a broken image."""
        p = Path(path)
        if not p.is_file():
            return self.missing(f"picture not produced: {p.name}")
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        style = f' style="width:{int(width)}px"' if width else ""
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        self.blocks.append(f'<figure><img alt="{_esc(caption or p.name)}" src="data:image/png;base64,{data}"{style}>'
                           f"{cap}</figure>")
        return self

    def html(self, anchor: str) -> str:
        return f'<section id="{anchor}"><h2>{_esc(self.title)}</h2>\n' + "\n".join(self.blocks) + "</section>"


class HtmlReport:
    """An ordered list of sections with a title, subtitle and table of contents."""

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        self.title = title
        self.subtitle = subtitle
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        sec = Section(title)
        self.sections.append(sec)
        return sec

    def render(self) -> str:
        toc = "".join(f'<li><a href="#s{i}">{_esc(s.title)}</a></li>' for i, s in enumerate(self.sections))
        sub = f'<p class="subtitle">{_esc(self.subtitle)}</p>' if self.subtitle else ""
        body = "\n".join(s.html(f"s{i}") for i, s in enumerate(self.sections))
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{_esc(self.title)}</title><style>{_CSS}</style></head><body>\n"
                f"<h1>{_esc(self.title)}</h1>{sub}<nav><ol>{toc}</ol></nav>\n{body}\n</body></html>\n")

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (a reader never sees half a report)."""
        from dagman.fileio import atomic_write

        path = Path(path)
        text = self.render().encode("utf-8")
        atomic_write(path, lambda fh: fh.write(text))
        return path
