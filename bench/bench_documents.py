"""What reading a PDF costs: a 10-page document, its first 4 pages rendered for the model and the other 6 pages'
text read (documents.open_pdf, the page policy's default), fresh each time (no page cache).

    python bench/bench_documents.py

Printed: the median of 5 runs, and the same as a share of a 4-row decode step of the 1.3B on this machine when
`--step-ms` gives one (bench/bench_grammar.py prints it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fpdf import FPDF  # noqa: E402

from dsvl_app.documents import open_pdf  # noqa: E402
from dsvl_app.settings import Limits  # noqa: E402


def ten_pages() -> bytes:
    pdf = FPDF()
    for n in range(1, 11):
        pdf.add_page()
        pdf.set_font("helvetica", size=12)
        for line in range(40):
            pdf.cell(text=f"Page {n}, line {line}: quarterly figures, totals and remarks for the report.")
            pdf.ln(6)
        pdf.set_fill_color(30, 90, 200)
        pdf.rect(20, 200, 170, 60, style="F")
    return bytes(pdf.output())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=None, help="a decode step's time, for the share")
    args = parser.parse_args()
    data = ten_pages()
    times = []
    for _ in range(5):
        with tempfile.TemporaryDirectory() as folder:
            began = time.perf_counter()
            doc = open_pdf(data, "report.pdf", Path(folder), Limits(), image_slots=4)
            times.append(time.perf_counter() - began)
    median = statistics.median(times)
    print(f"10-page PDF ({len(data) // 1024} KB): {doc.summary()}")
    print(f"  rendered and read in {median * 1000:.0f} ms (median of 5; {min(times) * 1000:.0f}-{max(times) * 1000:.0f})")
    if args.step_ms:
        print(f"  = {median * 1000 / args.step_ms:.1f} decode steps of {args.step_ms:.1f} ms (done once, before the "
              "prompt is read, in the request's thread: other replies keep decoding)")


if __name__ == "__main__":
    main()
