"""The review page: each page beside what was extracted from it, with the selection's charts.

One self-contained HTML file (no server, no network: thumbnails as data URIs, charts as
inline SVG, its own script allowed by hash in a Content-Security-Policy), split into linked
files past `review.pages_per_file` pages. Modules: `gather` (Parquet -> cards and totals),
`thumbs` (pages re-created from their sources, checked against `content_sha256`, encoded
small), `charts` (matplotlib SVG), `page` (the escaped HTML), `static` (style, script, CSP),
`build` (the whole, and the end-of-run hook).
"""

from ernie_batch.review.build import ReviewResult, build_review, part_paths, review_of_run

__all__ = ["ReviewResult", "build_review", "part_paths", "review_of_run"]
