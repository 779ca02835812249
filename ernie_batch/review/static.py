"""The review page's own style sheet and script, and the Content-Security-Policy that admits
only them.

The script is allowed by its sha256 (not 'unsafe-inline'), so even markup that slipped past
escaping could run nothing: an injected `<script>` or `onerror=` attribute has no hash.
Styles stay 'unsafe-inline' because matplotlib's SVG styles every element with a `style`
attribute (a hash cannot allow those); with `default-src 'none'` and `img-src data:` a
style can fetch nothing either. Python strings, not package files, so the page needs no
package data.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
:root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;
  background:#f4f5f7;font-size:14px}
body{margin:0}
header{padding:16px 24px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:20px;margin:0 0 4px}
.sub{color:#555;margin:0 0 12px}
.totals{display:flex;flex-wrap:wrap;gap:8px 28px;margin:0;padding:0;list-style:none}
.totals li{color:#555}
.totals b{display:block;font-size:18px;color:#1b1b1b}
.charts{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.charts figure{margin:0;background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:4px}
.charts svg{width:380px;max-width:100%;height:auto;display:block}
nav.filters{position:sticky;top:0;z-index:2;display:flex;flex-wrap:wrap;gap:8px 18px;
  align-items:center;padding:8px 24px;background:#263238;color:#fff}
nav.filters select{max-width:260px}
#shown{margin-left:auto;font-weight:600}
nav.parts{padding:8px 24px}
nav.parts a,nav.parts strong{margin-right:10px}
main{display:grid;gap:12px;padding:12px 24px}
.card{display:grid;grid-template-columns:210px minmax(0,1fr);gap:16px;background:#fff;
  border:1px solid #ddd;border-left:6px solid #2e7d32;border-radius:6px;padding:12px}
.card[hidden]{display:none}
.st-invalid_answer{border-left-color:#c62828}.st-api_error{border-left-color:#ad1457}
.st-input_error{border-left-color:#ef6c00}.st-skipped{border-left-color:#9e9e9e}
.st-duplicate{border-left-color:#1565c0}
.zoom{border:0;padding:0;background:none;cursor:zoom-in;display:block;position:relative}
svg.boxes{position:absolute;inset:0;width:100%;height:100%;pointer-events:none}
svg.boxes rect{fill:rgba(46,125,50,.18);stroke:#2e7d32;stroke-width:1.5;
  vector-effect:non-scaling-stroke}
.ev{margin-top:2px;font-size:12px;color:#37474f;white-space:normal}
.ev ul{margin:4px 0 0;padding-left:18px}
.ev-badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;color:#fff;
  background:#607d8b;vertical-align:baseline}
.ev-verified{background:#2e7d32}.ev-quote_not_on_page{background:#c62828}
.ev-value_not_in_quote{background:#d84315}.ev-no_quote{background:#8d6e63}
.ev-no_text_layer{background:#78909c}.ev-not_checked{background:#b0bec5;color:#263238}
q.quote{font-style:italic}
body.only-unverified tr.ev-ok{display:none}
.thumb{width:210px;height:auto;border:1px solid #ccc;display:block;background:#fff}
.ph{width:210px;min-height:150px;display:flex;align-items:center;justify-content:center;
  text-align:center;box-sizing:border-box;padding:10px;font-size:12px;color:#444;
  border:1px dashed #999;background:repeating-linear-gradient(45deg,#eee 0 10px,#e2e2e2 10px 20px)}
.check{font-size:11px;color:#555;margin:6px 0 0}
.check.differs{color:#a15c00}
h2{font-size:15px;margin:0 0 6px;overflow-wrap:anywhere}
.badge{display:inline-block;font-size:12px;padding:1px 8px;border-radius:10px;color:#fff;
  background:#2e7d32;vertical-align:middle}
.badge.st-invalid_answer{background:#c62828}.badge.st-api_error{background:#ad1457}
.badge.st-input_error{background:#ef6c00}.badge.st-skipped{background:#757575}
.badge.st-duplicate{background:#1565c0}
.error{color:#b71c1c;margin:0 0 6px;overflow-wrap:anywhere}
table.fields{border-collapse:collapse;width:100%}
table.fields th{text-align:left;width:24%;vertical-align:top;padding:3px 8px 3px 0;
  color:#455a64;font-weight:600;overflow-wrap:anywhere}
table.fields td{padding:3px 0;white-space:pre-wrap;overflow-wrap:anywhere}
tr.empty td{color:#999;font-style:italic}
tr.conflict th,tr.conflict td{background:#fff3e0}
.meta{font-size:12px;color:#555;margin:8px 0 0;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px;background:#f7f7f7;padding:8px;
  max-height:240px;overflow:auto;margin:4px 0}
#lightbox{position:fixed;inset:0;background:rgba(0,0,0,.82);display:flex;flex-direction:column;
  align-items:center;justify-content:center;z-index:10;cursor:zoom-out;color:#fff}
#lightbox[hidden]{display:none}
#lightbox img{max-width:94vw;max-height:90vh;background:#fff}
"""

SCRIPT = """
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const data = JSON.parse($("review-data").textContent);
  const main = $("cards");
  const cards = new Map();
  for (const el of main.querySelectorAll("article.card")) cards.set(el.dataset.i, el);
  const value = (id) => ($(id) ? $(id).value : "");
  function visible(d) {
    const status = value("f-status"), empty = value("f-empty"), folder = value("f-folder");
    const conflicts = $("f-conflicts"), unverified = $("f-unverified");
    if (status && d.status !== status) return false;
    if (empty === "*" && d.empty.length === 0) return false;
    if (empty && empty !== "*" && !d.empty.includes(empty)) return false;
    if (folder && d.folder !== folder) return false;
    if (conflicts && conflicts.checked && d.conflicts.length === 0) return false;
    if (unverified && unverified.checked && d.unverified === 0) return false;
    return true;
  }
  const byKey = (key, dir) => (a, b) => {
    const x = a[key], y = b[key];
    if (x === null || y === null) return x === y ? a.i - b.i : (x === null ? 1 : -1);
    return (x - y) * dir || a.i - b.i;
  };
  function apply() {
    const sort = value("f-sort") || "odd";
    const rows = data.cards.slice();
    if (sort !== "odd") {
      const [key, dir] = sort.split("-");
      rows.sort(byKey(key, dir === "desc" ? -1 : 1));
    }
    let shown = 0;
    const order = document.createDocumentFragment();
    for (const d of rows) {
      const el = cards.get(String(d.i));
      el.hidden = !visible(d);
      if (!el.hidden) shown += 1;
      order.appendChild(el);
    }
    main.appendChild(order);
    document.body.classList.toggle("only-unverified", !!($("f-unverified") || {}).checked);
    $("shown").textContent = shown + " of " + rows.length + " pages shown";
  }
  for (const id of ["f-status", "f-empty", "f-folder", "f-conflicts", "f-unverified", "f-sort"]) {
    if ($(id)) $(id).addEventListener("change", apply);
  }
  const box = $("lightbox"), big = $("lightbox-img"), caption = $("lightbox-caption");
  main.addEventListener("click", (event) => {
    const img = event.target.closest("img.thumb");
    if (!img) return;
    big.src = img.src;
    big.alt = img.alt;
    caption.textContent = img.alt;
    box.hidden = false;
  });
  box.addEventListener("click", () => { box.hidden = true; big.removeAttribute("src"); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !box.hidden) box.click();
  });
})();
"""


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       f"script-src 'sha256-{_sha256(SCRIPT)}'; base-uri 'none'; form-action 'none'")
