"""Benchmark `intake`: the prepare stage against a plain pypdf + Pillow loop, and its memory.

One run generates a corpus (multi-page PDFs, 3000x4000 JPEG photos), then measures
- pages/s of a plain single-process loop (pypdf one-writer-per-page split; Pillow open,
  LANCZOS resize to 1600 px, JPEG) over the corpus;
- pages/s of `PreparePool` with 1 and with 2 worker processes (pool start-up excluded and
  reported apart: a run pays it once);
- peak RSS of the whole process tree while streaming the corpus, and the same corpus listed
  10 times (memory must not grow with the number of documents).
Prints one JSON object (`python -m ernie_batch.bench.intake [scale]`).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

MAX_SIDE = 1600


# --- corpus ------------------------------------------------------------------------------------


def _photo(path: Path, seed: int) -> None:
    """A 3000x4000 JPEG with photo-like entropy (smooth gradients plus sensor-like noise)."""
    from PIL import Image

    w, h = 3000, 4000
    noise = Image.effect_noise((w // 4, h // 4), 40 + seed % 20).resize((w, h))
    grad = Image.linear_gradient("L").resize((w, h))
    rgb = Image.merge("RGB", (noise, grad, grad.rotate(90 + seed).resize((w, h))))
    rgb.save(path, "JPEG", quality=90)


def _pdf(path: Path, pages: int, seed: int) -> None:
    """Text pages sharing one resource dictionary (font + a logo image), like office exports."""
    import pikepdf

    pdf = pikepdf.new()
    logo = pikepdf.Stream(pdf, bytes((seed + i * 37) % 256 for i in range(120 * 120)))
    logo.Type, logo.Subtype = pikepdf.Name.XObject, pikepdf.Name.Image
    logo.Width = logo.Height = 120
    logo.ColorSpace, logo.BitsPerComponent = pikepdf.Name.DeviceGray, 8
    font = pikepdf.Dictionary(
        Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica
    )
    stamp = pikepdf.Stream(pdf, bytes((seed * 3 + i) % 256 for i in range(60_000)))
    stamp.Type, stamp.Subtype = pikepdf.Name.XObject, pikepdf.Name.Image
    stamp.Width, stamp.Height = 200, 300
    stamp.ColorSpace, stamp.BitsPerComponent = pikepdf.Name.DeviceGray, 8
    shared = pdf.make_indirect(
        pikepdf.Dictionary(
            Font=pikepdf.Dictionary(F1=pdf.make_indirect(font)),
            XObject=pikepdf.Dictionary(
                Logo=pdf.make_indirect(logo), Stamp=pdf.make_indirect(stamp)
            ),
        )
    )
    for n in range(pages):
        lines = "".join(
            f"BT /F1 10 Tf 72 {720 - 14 * k} Td (Page {n + 1} line {k}: lorem ipsum dolor) Tj ET\n"
            for k in range(40)
        )
        content = f"q 60 0 0 60 480 720 cm /Logo Do Q\n{lines}".encode()
        page = pikepdf.Dictionary(
            Type=pikepdf.Name.Page,
            MediaBox=[0, 0, 612, 792],
            Contents=pikepdf.Stream(pdf, content),
            Resources=shared,
        )
        pdf.pages.append(pikepdf.Page(page))
    pdf.save(path)


def make_corpus(folder: Path, scale: float) -> list[Path]:
    n_pdfs = max(1, round(6 * scale))
    n_photos = max(1, round(8 * scale))
    paths = []
    for i in range(n_pdfs):
        paths.append(folder / f"doc-{i:02d}.pdf")
        _pdf(paths[-1], pages=50, seed=i)
    for i in range(n_photos):
        paths.append(folder / f"photo-{i:02d}.jpg")
        _photo(paths[-1], seed=i)
    return paths


# --- the plain loop ------------------------------------------------------------------------------


def plain_loop(paths: list[Path]) -> int:
    """What a script would do by hand: pypdf page writers, Pillow resize. Returns pages."""
    import pypdf
    from PIL import Image

    pages = 0
    for path in paths:
        if path.suffix == ".pdf":
            reader = pypdf.PdfReader(path)
            for page in reader.pages:
                writer = pypdf.PdfWriter()
                writer.add_page(page)
                writer.write(io.BytesIO())
                pages += 1
        else:
            with Image.open(path) as im:
                scale = MAX_SIDE / max(im.size)
                size = (round(im.width * scale), round(im.height * scale))
                im.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(
                    io.BytesIO(), "JPEG", quality=85
                )
            pages += 1
    return pages


# --- the pipeline --------------------------------------------------------------------------------


class TreeRss:
    """Peak resident memory of this process and all its descendants, sampled from /proc."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(self.interval)


def tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) of root and its descendants (Linux)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read()
                parents[int(entry)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == pid and p not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


async def _pipeline(docs: list, workers: int) -> tuple[int, float, float]:
    """(pages, seconds streaming, seconds starting the pool) with `workers` processes."""
    from ernie_batch.config import ImageOptions, PdfOptions, PrepareOptions
    from ernie_batch.intake.prepare import PreparePool
    from ernie_batch.intake.units import PageUnit

    opts = PrepareOptions(workers=workers, queue_size=8, timeout_s=300)
    async with PreparePool(ImageOptions(max_side=MAX_SIDE), PdfOptions(), opts) as pool:
        t0 = time.perf_counter()
        async for _ in pool.stream(docs[:workers]):  # warm the workers (imports, start-up)
            pass
        started = time.perf_counter() - t0
        pages, t1 = 0, time.perf_counter()
        async for _, rows in pool.stream(docs):
            pages += sum(isinstance(r, PageUnit) for r in rows)
        return pages, time.perf_counter() - t1, started


def _burn(n: int) -> float:
    t = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - t


def cpu_scaling(n: int = 2_000_000) -> float:
    """How much faster 2 processes burn CPU than 1 on this machine right now (ideal: 2.0).

    Shared CI machines often give less than their core count; read `ratio_2_workers` with it.
    """
    import multiprocessing

    from pebble import ProcessPool

    ctx = multiprocessing.get_context("forkserver")
    rates = []
    for workers in (1, 2):
        with ProcessPool(max_workers=workers, context=ctx) as pool:
            list(pool.map(_burn, [200_000] * 4 * workers).result())  # start and warm every worker
            t = time.perf_counter()
            list(pool.map(_burn, [n] * 4).result())
            rates.append(4 / (time.perf_counter() - t))
    return rates[1] / rates[0]


def run(scale: float = 1.0) -> dict:
    """Generate the corpus, measure, and return the figures (see the module docstring)."""
    from ernie_batch.config import SourceOptions
    from ernie_batch.intake.discover import discover

    with tempfile.TemporaryDirectory(prefix="ernie-bench-intake-") as tmp:
        paths = make_corpus(Path(tmp), scale)
        docs, _ = discover(SourceOptions(paths=[Path(tmp)]))
        t = time.perf_counter()
        plain_pages = plain_loop(paths)
        plain_s = time.perf_counter() - t
        pages1, s1, start1 = asyncio.run(_pipeline(docs, 1))
        pages2, s2, start2 = asyncio.run(_pipeline(docs, 2))
        with TreeRss() as rss1:
            asyncio.run(_pipeline(docs, 2))
        with TreeRss() as rss10:
            asyncio.run(_pipeline(docs * 10, 2))
    plain_rate = plain_pages / plain_s
    rate1, rate2 = pages1 / s1, pages2 / s2
    mb = 1024 * 1024
    return {
        "scenario": "intake",
        "ratio": round(rate1 / plain_rate, 3),
        "goal": 0.9,
        "ratio_2_workers": round(rate2 / plain_rate, 3),
        "goal_2_workers": 1.7,
        "plain_pages_per_s": round(plain_rate, 1),
        "pipeline_pages_per_s_1_worker": round(rate1, 1),
        "pipeline_pages_per_s_2_workers": round(rate2, 1),
        "pool_start_s": round(max(start1, start2), 2),
        "pages": plain_pages,
        "pipeline_pages": pages1,
        "documents": len(docs),
        "peak_rss_mb_1x": round(rss1.peak / mb, 1),
        "peak_rss_mb_10x": round(rss10.peak / mb, 1),
        "rss_growth_10x": round(rss10.peak / rss1.peak, 3),
        "goal_rss_growth": 1.2,
        "goal_rss_mb": 500,
        "cores": len(os.sched_getaffinity(0)),
        "cpu_scaling_2_procs": round(cpu_scaling(), 2),
        "scale": scale,
    }


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)))
