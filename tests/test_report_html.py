"""The HTML report builder and the report figures."""

from __future__ import annotations

import base64

import numpy as np

from dagman.report.html import HtmlReport
from dagman.report.plots import loss_curves_figure, roc_figure


def test_report_escapes_embeds_and_marks_missing(tmp_path):
    png = roc_figure({"a": (np.array([0, 0.5, 1]), np.array([0, 0.8, 1]), "AUC 0.65")}, tmp_path / "roc.png")
    rep = HtmlReport("t <1>", subtitle="sub & co")
    sec = rep.section("numbers")
    sec.table(["name", "value"], [["<b>x</b>", 0.123456], ["n", 7]], caption="cap")
    sec.image(png, "roc")
    sec.image(tmp_path / "nope.png", "missing one")
    sec.note("tiny budgets")
    path = rep.write(tmp_path / "r" / "report.html")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text
    assert '<td class="num">0.123</td>' in text and '<td class="num">7</td>' in text
    assert "picture not produced: nope.png" in text
    b64 = base64.b64encode(png.read_bytes()).decode()
    assert f"data:image/png;base64,{b64}" in text
    assert 'href="#s0"' in text and "t &lt;1&gt;" in text
    assert not list((tmp_path / "r").glob("*.tmp*"))  # atomic write leaves no temp file


def test_loss_curves_figure_writes_png(tmp_path):
    runs = {"dagman": [{"step": i, "loss": 3 - 0.01 * i, "loss_amip": 0.5} for i in range(1, 30)],
            "smit": [{"step": i, "loss": 2.5, "loss_gitd": float("nan")} for i in range(1, 30)]}
    path = loss_curves_figure(runs, tmp_path / "l.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
