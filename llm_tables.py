"""Every table of a report as CSV and as a LaTeX ``booktabs`` table, beside the report.

The rows are the report's own: each Markdown table of ``report.md`` (or ``compare.md``) is read
back cell by cell, so the CSV and the LaTeX hold exactly what the reader sees, whichever module
wrote the table (the report, the robustness matrix, the comparison). ``with_tables(md, out)``
writes ``<out>/tables/<name>.csv`` and ``.tex`` and returns the Markdown with a line under each
table naming its two files; ``with_captions`` puts each figure's caption line under it.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import llm_io as IO
import llm_plots as P
import llm_results as R

_SEP = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")
_FIGURE = re.compile(r"^!\[[^\]]*\]\((plots/([\w.-]+)\.png)\)\s*$")
# Characters LaTeX reads as commands or sets as other glyphs ("|", "<" in OT1); brackets too, since "["
# after a row's "\\" is an optional argument.
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "[": "{[}",
          "]": "{]}",
          "±": r"$\pm$", "†": r"$^\dagger$", "×": r"$\times$", "→": r"$\rightarrow$",
          "ε": r"$\varepsilon$", "Δ": r"$\Delta$", "≥": r"$\geq$", "≤": r"$\leq$", "—": "---", "–": "--",
          "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


class Table(NamedTuple):
    """One Markdown table of a report: its file name, the heading it sits under, its cells."""
    name: str
    heading: str
    header: list
    rows: list
    end: int  # index of its last line in the Markdown


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row: split on "|" that is not escaped ("\\|" stays in a cell)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def plain(cell: str) -> str:
    """A Markdown cell as plain text: escapes undone, emphasis and code marks dropped."""
    cell = re.sub(r"\*\*(.+?)\*\*", r"\1", cell)
    cell = re.sub(r"(?<!\\)`", "", cell)
    return re.sub(r"\\([\\`*_\[\]!|#{}()<>+.-])", r"\1", cell)


def slug(text: str) -> str:
    """A file name from a heading: "Zero-shot accuracy (lm-eval)" -> "zero_shot_accuracy_lm_eval"."""
    return re.sub(r"[^a-z0-9]+", "_", plain(text).lower())[:48].strip("_") or "table"


def find_tables(md: str) -> list[Table]:
    """Every table of ``md`` in order, named after the heading above it (``_2``, ``_3`` for the
    next tables under the same heading)."""
    lines, tables, heading, used = md.split("\n"), [], "report", {}
    i = 0
    while i < len(lines):
        h = _HEADING.match(lines[i])
        if h:
            heading = h.group(1).strip()
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and _SEP.match(lines[i + 1].strip()):
            header, rows, j = split_row(lines[i]), [], i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append(split_row(lines[j]))
                j += 1
            base = slug(heading)
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}_{used[base]}"
            tables.append(Table(name, heading, header, rows, j - 1))
            i = j
            continue
        i += 1
    return tables


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV injection"):
# "=cmd|' /C calc'!A0", "@SUM(...)", "+HYPERLINK(...)", also after leading spaces.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
_PLAIN_NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+(\.\d*)?|\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def csv_cell(text: str) -> str:
    """A cell as a spreadsheet must read it: as text, never as a formula. A cell that starts
    (after spaces) with ``= + - @``, a tab, CR or LF gets a single quote in front, OWASP's remedy,
    unless it is a plain number (``-0.5``, ``+3``, ``-1e-05``, ``-1,234``), which stays a number, or the lone
    ``-`` that marks a missing value. A cell that already starts with a quote gets one more, so
    ``csv_value`` recovers every value exactly by dropping one leading quote."""
    head = text.lstrip(" ")[:1]
    if text.startswith("'") or (head and head in _FORMULA_START and text != "-"
                                and not _PLAIN_NUMBER.fullmatch(text)):
        return "'" + text
    return text


def csv_value(cell: str) -> str:
    """The value behind a cell written by ``csv_cell``: one leading quote dropped."""
    return cell[1:] if cell.startswith("'") else cell


def csv_text(table: Table) -> str:
    """The table as CSV: a header row, then the rows, each cell as plain text that no spreadsheet
    reads as a formula (``csv_cell``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([csv_cell(plain(c)) for c in table.header])
    w.writerows([csv_cell(plain(c)) for c in r] for r in table.rows)
    return buf.getvalue()


def latex_escape(text: str) -> str:
    """Plain text as LaTeX text: every special character escaped, the report's symbols as math."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _numeric(cell: str) -> bool:
    return bool(re.fullmatch(r"[-+x]?[\d.,]+(e[-+]?\d+)?%?( \[.*\])?( ±.*)?( †)?|-", plain(cell)))


def latex_text(table: Table, caption: Optional[str] = None) -> str:
    """The table as a LaTeX ``booktabs`` table (\\usepackage{booktabs}): numeric columns right-aligned."""
    width = len(table.header)
    rows = [r + [""] * (width - len(r)) for r in table.rows]
    align = "".join("r" if rows and all(_numeric(r[k]) for r in rows) else "l" for k in range(width))

    def line(cells):
        return " & ".join(latex_escape(plain(c)) for c in cells[:width]) + r" \\"

    return "\n".join([r"\begin{table}[ht]", r"\centering", r"\small",
                      rf"\caption{{{latex_escape(plain(caption or table.heading))}}}",
                      rf"\label{{tab:{table.name}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
                      line(table.header), r"\midrule", *[line(r) for r in rows], r"\bottomrule",
                      r"\end{tabular}", r"\end{table}", ""])


def with_tables(md: str, out: Path) -> str:
    """Write every table of ``md`` to ``<out>/tables/<name>.csv`` and ``.tex`` and return ``md`` with
    a line under each table naming its files. The tables of an earlier report that this one no longer
    has are removed, but only those this tool's manifest (``llm_io.written``) says it wrote: a file of
    the user's in ``tables/`` is kept, and a ``tables`` that links out of ``out`` is refused."""
    out = Path(out)
    folder = out / "tables"
    tables = find_tables(md)
    with IO.writing_into(out):
        IO.check_inside(folder / "x.csv")  # before anything is removed or written
        names = {f"tables/{t.name}{ext}" for t in tables for ext in (".csv", ".tex")}
        # a rebuilt report with fewer tables: no stale file of ours may pass for one of its tables
        for rel in sorted(IO.written(out)):
            if rel.startswith("tables/") and rel.endswith((".csv", ".tex")) and rel not in names:
                IO.remove_written(out, rel)
        lines = md.split("\n")
        for t in reversed(tables):  # from the end, so each table's line index still holds
            IO.write_text(folder / f"{t.name}.csv", csv_text(t))
            IO.write_text(folder / f"{t.name}.tex", latex_text(t))
            lines[t.end + 1:t.end + 1] = ["", f"Table as [CSV](tables/{t.name}.csv) and "
                                              f"[LaTeX](tables/{t.name}.tex)."]
    return "\n".join(lines)


def with_captions(md: str, caption: Callable[[str], Optional[str]]) -> str:
    """``md`` with, under each figure ``plots/<stem>.png``, its caption line ``caption(stem)`` and
    where its PDF is; a figure without a caption keeps only the PDF line."""
    out = []
    for line in md.split("\n"):
        out.append(line)
        m = _FIGURE.match(line.strip())
        if m:
            text = caption(m.group(2))
            out += ["", (f"*Figure: {R.esc(text)}* " if text else "") + f"PDF: [{m.group(2)}.pdf](plots/"
                    f"{m.group(2)}.pdf)."]
    return "\n".join(out)


def paper_markdown(md: str, results: dict, out: Path) -> str:
    """The report's Markdown with every figure's caption and PDF under it, and every table written
    to ``<out>/tables`` and named under it."""
    names = {Path(str(p)).stem: n for n, p in R.field(results, "plots", kind=dict, default={}).items()}
    return with_tables(with_captions(md, lambda stem: P.figure_caption(results, names[stem]) if stem in names
                                     else None), out)


# A wide table scrolls inside its own box instead of running off the page (a 1,100 px window cut the
# perplexity table's KL and top-1 columns).
TABLE_CSS = ".table-box{overflow-x:auto;max-width:100%;margin:1em 0}.table-box table{margin:0}"


def html_tables(body_html: str, base: Path) -> str:
    """Each <table> of the HTML in a box that scrolls sideways; the "[CSV](tables/x.csv)" and
    "[x.pdf](plots/x.pdf)" texts that ``paper_markdown`` wrote become links, where that file is in
    ``base`` (Markdown links are off in the page, so that no text from a model becomes a link)."""
    body_html = body_html.replace("<table>", '<div class="table-box"><table>').replace("</table>",
                                                                                      "</table></div>")

    def link(m: re.Match) -> str:
        here = (Path(base) / m.group(2)).is_file()
        return f'<a href="{m.group(2)}">{m.group(1)}</a>' if here else m.group(0)
    return re.sub(r"\[([\w. -]+)\]\(((?:tables|plots)/[\w.-]+\.(?:csv|tex|pdf))\)", link, body_html)


def compare_caption(rows: list) -> str:
    """The comparison figure's caption line: each run's model, eval text, window and tokens scored."""
    def run(r: dict) -> str:
        p = r.get("protocol") or {}
        return (f"{r.get('label')} = {p.get('model')} on {p.get('eval text')}, windows of {p.get('window')} "
                f"tokens, {p.get('tokens scored')} tokens scored")
    return "Runs: " + "; ".join(run(r) for r in rows) + "."
