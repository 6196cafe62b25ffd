"""A static HTML dashboard of a dictionary's latents (``sparsen sae dashboard``): one pass over a corpus, no server.

One streamed pass over ``windows`` (a few at a time) reads the dictionary's input hook, encodes it and keeps, per
latent, running sums and nothing per token:

- density: the share of positions (from ``skip_first`` on) where the latent is nonzero; count: how many;
- max activation: the activation of largest magnitude (signed: AbsTopK latents fire negative too); mean activation
  when active: the sum over active positions / count;
- a histogram of its nonzero activations in ``2 * HIST_BINS`` bins of width 2^e, e per latent, chosen when the
  latent first fires and doubled (adjacent bins merged) whenever a larger activation arrives, so the bins always
  span [-HIST_BINS * 2^e, HIST_BINS * 2^e) with the largest |activation| in the upper half of that range;
- its ``top_contexts`` positions of largest |activation|, each with the latent's activations at the
  ``context_radius`` positions either side: a [d_sae, K] top-k merged batch by batch (vectorised over latents).

Logit effects read only weights: a latent's decoder row is mapped to the residual stream (a dictionary writing
``attn.hook_z``: through o, row @ W_O.T; any other hook already lives there: resid_pre/post, mlp_out, attn
heads' results, and mlp_in treated as residual-space), multiplied by the final norm's gain and by the unembedding:
``(row * gain) @ W_U.T``. The top 10 / bottom 10 tokens and max |logit| (the "logit effect") are shown; on
Gemma 3 the attention branch's output norm is not linear and is left out of that map.

Output: ``index.html`` (every latent, a table sortable by clicking its headers, inline CSS/JS, nothing fetched),
``latents/<id>.html`` for the most frequent live latents (``max_pages``; all by default), and ``latents.json`` (the
numbers). Pages are written first and the index last, each file atomically.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from sparsen.errors import SparsenError
from sparsen.io import write_json, write_text
from sparsen.models.hookpoints import hook_point, read_activations

HIST_BINS = 32
"""histogram bins per sign"""
LOGIT_TOKENS = 10


class LatentStats(NamedTuple):
    """What one pass over the windows keeps, per latent (d_sae rows)."""

    tokens: int
    """positions analysed (windows x (ctx - skip_first))"""
    count: torch.Tensor
    """[d_sae] long: positions where the latent is nonzero"""
    sum_act: torch.Tensor
    """[d_sae] float64: sum of its activations"""
    max_act: torch.Tensor
    """[d_sae]: the activation of largest magnitude (0 for a dead latent)"""
    hist: torch.Tensor
    """[d_sae, 2 * HIST_BINS] long: bin j covers [(j - HIST_BINS) * 2^e, (j - HIST_BINS + 1) * 2^e)"""
    hist_exp: torch.Tensor
    """[d_sae] long: e, the bins' width exponent"""
    top_act: torch.Tensor
    """[d_sae, K]: the top activations by magnitude, largest first (0 past the latent's active positions)"""
    top_where: torch.Tensor
    """[d_sae, K] long: window * ctx + position of each"""
    top_context: torch.Tensor
    """[d_sae, K, 2 * radius + 1]: the latent's activations around each (0 outside the window, before skip_first)"""
    skip_first: int
    radius: int

    @property
    def density(self) -> torch.Tensor:
        return self.count.double() / max(self.tokens, 1)

    @property
    def mean_active(self) -> torch.Tensor:
        return torch.where(self.count > 0, self.sum_act / self.count.clamp_min(1), torch.zeros_like(self.sum_act))


class LogitEffects(NamedTuple):
    effect: torch.Tensor
    """[d_sae] max |logit| of the latent's decoder direction"""
    top_ids: torch.Tensor
    """[d_sae, n] the tokens it raises most, largest first"""
    top_logits: torch.Tensor
    bottom_ids: torch.Tensor
    """[d_sae, n] the tokens it lowers most, most negative first"""
    bottom_logits: torch.Tensor


class Dashboard(NamedTuple):
    index: Path
    latents: int
    live: int
    pages: int


def _input_point(lm, sae):
    cfg = sae.cfg
    if not cfg.hook_name:
        raise SparsenError("the dictionary does not say which hook it reads (cfg.hook_name): set it")
    point = hook_point(lm.adapter, cfg.hook_name)
    if point.kind == "attn.hook_result":
        raise SparsenError(f"{cfg.hook_name} holds one vector per head, not per token: a dashboard shows per-token "
                           "dictionaries (use attn.hook_z for attention outputs)")
    if point.d != cfg.d_in:
        raise SparsenError(f"the dictionary reads {cfg.d_in}-wide activations but {cfg.hook_name} is {point.d} wide: "
                           "pass the model it was trained on")
    return point


@torch.no_grad()
def latent_stats(lm, sae, windows: torch.Tensor, top_contexts: int = 10, context_radius: int = 12,
                 skip_first: int = 1, batch_windows: int = 4, progress: bool = True) -> LatentStats:
    """The per-latent statistics of ``sae`` over ``windows`` [n, ctx] (see the module docstring), streamed."""
    point = _input_point(lm, sae)
    if windows.dim() != 2 or len(windows) == 0:
        raise SparsenError("the dashboard needs a non-empty [n, ctx] tensor of token windows")
    n, ctx = windows.shape
    if not 0 <= skip_first < ctx:
        raise SparsenError(f"skip_first {skip_first} leaves no position of a {ctx}-token window: use 0..{ctx - 1}")
    if top_contexts < 1 or context_radius < 0:
        raise SparsenError("top_contexts must be at least 1 and context_radius at least 0")
    d, K, R, NB = sae.cfg.d_sae, top_contexts, context_radius, HIST_BINS
    width = 2 * R + 1
    per = ctx - skip_first
    count = torch.zeros(d, dtype=torch.long)
    sum_act = torch.zeros(d, dtype=torch.float64)
    max_abs = torch.zeros(d)
    max_act = torch.zeros(d)
    hist = torch.zeros(d, 2 * NB, dtype=torch.long)
    hist_exp = torch.zeros(d, dtype=torch.long)
    started = torch.zeros(d, dtype=torch.bool)
    top_abs = torch.zeros(d, K)
    top_act = torch.zeros(d, K)
    top_where = torch.full((d, K), -1, dtype=torch.long)
    top_context = torch.zeros(d, K, width)
    lat = torch.arange(d)
    offsets = torch.arange(-R, R + 1)
    bins = torch.arange(-NB, NB, dtype=torch.float64)
    for start in tqdm(range(0, n, batch_windows), desc="sae dashboard: activations", unit="batch", disable=not progress):
        ids = windows[start:start + batch_windows]
        x = read_activations(lm.adapter, ids, [point])[point.name].float()
        f = sae.encode(x)
        f[:, :skip_first] = 0
        flat = f[:, skip_first:].reshape(-1, d)
        a = flat.abs()
        active = flat != 0
        count += active.sum(0)
        sum_act += flat.sum(0, dtype=torch.float64)
        m, arg = a.max(0)
        better = m > max_abs
        max_abs = torch.where(better, m, max_abs)
        max_act = torch.where(better, flat[arg, lat], max_act)

        # histogram: widen the bins (merge neighbours) of latents whose range this batch exceeds, then count
        fired = m > 0
        need = (torch.floor(torch.log2(m.double().clamp_min(1e-300) / NB)) + 1).long()
        new_exp = torch.where(fired, torch.where(started, torch.maximum(hist_exp, need), need), hist_exp)
        shift = torch.where(started, new_exp - hist_exp, 0).clamp(max=62)
        if bool((shift > 0).any()):
            target = torch.floor(bins[None] / torch.pow(2.0, shift.double())[:, None]).long() + NB
            hist = torch.zeros_like(hist).scatter_add_(1, target, hist)
        hist_exp, started = new_exp, started | fired
        r, c = active.nonzero(as_tuple=True)
        if len(r):
            v = flat[r, c].double() / torch.pow(2.0, hist_exp[c].double())
            b = torch.floor(v).long().clamp(-NB, NB - 1) + NB
            hist.view(-1).index_add_(0, c * 2 * NB + b, torch.ones_like(b))

        # top contexts: this batch's top-k per latent, merged with the running top-k
        k = min(K, flat.shape[0])
        bv, bi = a.T.topk(k, dim=1)  # [d, k] rows of flat
        wb, pos = bi // per, bi % per + skip_first
        around = pos[..., None] + offsets  # [d, k, width]
        inside = (around >= 0) & (around < ctx)
        ctx_acts = f[wb[..., None].expand_as(around), around.clamp(0, ctx - 1), lat[:, None, None]] * inside
        cand_abs = torch.cat([top_abs, bv], 1)
        keep = cand_abs.topk(K, dim=1).indices
        top_abs = cand_abs.gather(1, keep)
        top_act = torch.cat([top_act, flat[bi, lat[:, None]]], 1).gather(1, keep)
        top_where = torch.cat([top_where, (start + wb) * ctx + pos], 1).gather(1, keep)
        top_context = torch.cat([top_context, ctx_acts], 1).gather(1, keep[..., None].expand(-1, -1, width))
    return LatentStats(n * per, count, sum_act, max_act, hist, hist_exp, top_act, top_where, top_context, skip_first, R)


@torch.no_grad()
def logit_effects(lm, sae, n_tokens: int = LOGIT_TOKENS) -> LogitEffects | None:
    """Each latent's direct effect on the logits through its decoder row (module docstring); None when the
    dictionary's output hook is unknown to this model or the rows are not of its width."""
    cfg = sae.cfg
    adapter = lm.adapter
    try:
        point = hook_point(adapter, cfg.hook_name_out or cfg.hook_name)
    except SparsenError:
        return None
    rows = sae.W_dec.detach().float()
    if point.kind == "attn.hook_z":
        w_o = adapter.blocks[point.layer].linears["o"].weight.detach().float()  # [hidden, n_heads * head_dim]
        if rows.shape[1] != w_o.shape[1]:
            return None
        rows = rows @ w_o.T
    if rows.shape[1] != adapter.hidden_size:
        return None
    rows = rows * adapter.norm_gain(adapter.final_norm).float()
    unembed = adapter.lm_head.weight.detach().float()  # [vocab, hidden]
    n = min(n_tokens, unembed.shape[0])
    chunk = max(1, (1 << 24) // unembed.shape[0])
    parts = []
    for i in range(0, len(rows), chunk):
        logits = rows[i:i + chunk] @ unembed.T
        hi, lo = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        parts.append((logits.abs().amax(1), hi.indices, hi.values, lo.indices, lo.values))
    return LogitEffects(*(torch.cat(p) for p in zip(*parts)))


# --- HTML ----------------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse}th,td{padding:.25em .7em;text-align:right;border-bottom:1px solid #e4e4e4}
th{background:#f3f3f3;position:sticky;top:0}th[data-col]{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.dead{color:#999}a{color:#0645ad}
.meta{color:#555}.num{font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;margin:.35em 0;padding:.3em .5em;
  background:#fafafa;border:1px solid #eee}
.ctx .a{display:inline-block;min-width:5.5em;color:#555}
.t{border-radius:2px}.t.max{outline:2px solid #c00;font-weight:bold}
.logits{display:flex;gap:3em}.logits td:first-child{font-family:ui-monospace,monospace;white-space:pre;text-align:left}
"""

SORT_JS = """
(function(){
  var table = document.getElementById('latents'), body = table.tBodies[0];
  var heads = table.querySelectorAll('th[data-col]');
  function key(row, col){ return parseFloat(row.cells[col].getAttribute('data-v')); }
  heads.forEach(function(th){
    th.addEventListener('click', function(){
      var col = +th.getAttribute('data-col'), now = th.getAttribute('aria-sort');
      var dir = now ? (now === 'descending' ? 'ascending' : 'descending') : th.getAttribute('data-first');
      heads.forEach(function(h){ h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', dir);
      var sign = dir === 'ascending' ? 1 : -1, rows = Array.prototype.slice.call(body.rows);
      rows.sort(function(a, b){ return sign * (key(a, col) - key(b, col)) || key(a, 0) - key(b, 0); });
      var frag = document.createDocumentFragment();
      rows.forEach(function(r){ frag.appendChild(r); });
      body.appendChild(frag);
    });
  });
})();
"""


def _page(title: str, body: str, script: str = "") -> str:
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n{body}\n"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def _num(v: float) -> str:
    return f"{v:.4g}"


_CONTROLS = {c: 0x2400 + c for c in range(0x20)} | {0x7F: 0x2421}


class _Tokens:
    """Token id -> display text, decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            try:
                s = self.tokenizer.decode([i])
            except Exception:  # an id past the tokenizer's vocabulary (padded unembedding rows)
                s = ""
            s = (s or f"<{i}>").replace("\n", "\u21b5").replace("\t", "\u21e5")
            self.cache[i] = s.translate(_CONTROLS)  # other control characters as their pictures (a NUL would vanish)
        return self.cache[i]


def _histogram_svg(counts: list[int], exp: int) -> str:
    nz = [j for j, c in enumerate(counts) if c]
    if not nz:
        return ""
    lo, hi = min(nz[0], HIST_BINS), max(nz[-1] + 1, HIST_BINS)  # always include 0 as an edge
    used = counts[lo:hi]
    w_bin = 2.0 ** exp
    W, H, pad, bottom = 560, 160, 8, 22
    bw = (W - 2 * pad) / len(used)
    top = max(used)
    bars = []
    for j, c in enumerate(used):
        if not c:
            continue
        h = (H - bottom - pad) * c / top
        x0 = (lo + j - HIST_BINS) * w_bin
        bars.append(f"<rect x='{pad + j * bw:.1f}' y='{H - bottom - h:.1f}' width='{max(bw - 1, 0.5):.1f}' "
                    f"height='{h:.1f}' fill='#e8731a'><title>[{_num(x0)}, {_num(x0 + w_bin)}): {c}</title></rect>")
    left, right = (lo - HIST_BINS) * w_bin, (hi - HIST_BINS) * w_bin
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' viewBox='0 0 {W} {H}' role='img' "
            f"aria-label='histogram of nonzero activations'>"
            f"<line x1='{pad}' y1='{H - bottom}' x2='{W - pad}' y2='{H - bottom}' stroke='#888'/>{''.join(bars)}"
            f"<text x='{pad}' y='{H - 6}' font-size='11'>{_num(left)}</text>"
            f"<text x='{W - pad}' y='{H - 6}' font-size='11' text-anchor='end'>{_num(right)}</text>"
            f"<text x='{W - pad}' y='{pad + 10}' font-size='11' text-anchor='end'>max count {top}</text></svg>")


def _shade(a: float, scale: float) -> str:
    if a == 0 or scale <= 0:
        return ""
    alpha = min(abs(a) / scale, 1.0) * 0.85 + 0.08
    rgb = "232,115,26" if a > 0 else "40,110,220"
    return f" style='background:rgba({rgb},{alpha:.2f})'"


def _latent_page(i: int, stats: LatentStats, logits: LogitEffects | None, windows: list[list[int]], tok: _Tokens,
                 header: str) -> str:
    count = int(stats.count[i])
    density = count / max(stats.tokens, 1)
    max_act = float(stats.max_act[i])
    scale = abs(max_act)
    ctx = len(windows[0])
    R = stats.radius
    rows = [f"<tr><th>density</th><td class='num'>{density:.4%} ({count:,} of {stats.tokens:,} positions)</td></tr>",
            f"<tr><th>max activation</th><td class='num'>{_num(max_act)}</td></tr>",
            f"<tr><th>mean activation when active</th><td class='num'>{_num(float(stats.mean_active[i]))}</td></tr>"]
    if logits is not None:
        rows.append(f"<tr><th>logit effect (max |logit|)</th><td class='num'>{_num(float(logits.effect[i]))}</td></tr>")
    parts = [f"<p><a href='../index.html'>&larr; all latents</a></p><h1>Latent {i}</h1><p class='meta'>{header}</p>",
             f"<table class='summary'>{''.join(rows)}</table>",
             "<h2>Activation histogram</h2><p class='meta'>nonzero activations only</p>",
             _histogram_svg(stats.hist[i].tolist(), int(stats.hist_exp[i])),
             "<h2>Top activating contexts</h2>"]
    for act, where, around in zip(stats.top_act[i].tolist(), stats.top_where[i].tolist(), stats.top_context[i].tolist()):
        if act == 0 or where < 0:
            continue
        w, pos = divmod(where, ctx)
        spans = []
        if pos - R > 0:
            spans.append("\u2026")
        for off, a in zip(range(-R, R + 1), around):
            p = pos + off
            if not 0 <= p < ctx:
                continue
            text = html.escape(tok(windows[w][p]), quote=True)
            cls = "t max" if off == 0 else "t"
            spans.append(f"<span class='{cls}' title='{_num(a)}'{_shade(a, scale)}>{text}</span>")
        if pos + R < ctx - 1:
            spans.append("\u2026")
        parts.append(f"<div class='ctx' data-window='{w}' data-pos='{pos}'><span class='a'>{_num(act)}</span>"
                     f"{''.join(spans)}</div>")
    if logits is not None:
        def table(title, ids, vals):
            body = "".join(f"<tr><td>{html.escape(tok(int(t)), quote=True)}</td><td class='num'>{_num(v)}</td></tr>"
                           for t, v in zip(ids.tolist(), vals.tolist()))
            return f"<table><thead><tr><th>{title}</th><th>logit</th></tr></thead><tbody>{body}</tbody></table>"

        parts.append("<h2>Direct logit effects</h2><p class='meta'>decoder row &rarr; final norm's gain &rarr; unembedding"
                     "</p><div class='logits'>"
                     + table("raises", logits.top_ids[i], logits.top_logits[i])
                     + table("lowers", logits.bottom_ids[i], logits.bottom_logits[i]) + "</div>")
    return _page(f"Latent {i} \u00b7 sparsen dashboard", "\n".join(parts))


def render_dashboard(lm, sae, windows: torch.Tensor, stats: LatentStats, out: str | Path, max_pages: int | None = None,
                     progress: bool = True) -> Dashboard:
    """Write the pages of the most frequent live latents, latents.json, then index.html."""
    out = Path(out)
    cfg = sae.cfg
    d = cfg.d_sae
    logits = logit_effects(lm, sae)
    tok = _Tokens(lm.tokenizer)
    live = [i for i in range(d) if int(stats.count[i]) > 0]
    by_freq = sorted(live, key=lambda i: (-int(stats.count[i]), i))
    paged = set(by_freq if max_pages is None else by_freq[:max(0, max_pages)])
    n, ctx = windows.shape
    what = f"{cfg.hook_name} \u2192 {cfg.hook_name_out}" if cfg.hook_name_out else cfg.hook_name
    header = html.escape(f"{cfg.architecture or 'dictionary'} on {what} of {getattr(lm, 'spec', 'the model')}; "
                         f"{stats.tokens:,} positions from {n:,} windows of {ctx} tokens")
    ids = windows.tolist()
    for i in tqdm(sorted(paged), desc="sae dashboard: pages", unit="page", disable=not progress):
        write_text(out / "latents" / f"{i}.html", _latent_page(i, stats, logits, ids, tok, header))

    density, mean = stats.density, stats.mean_active
    records = []
    rows = []
    for i in range(d):
        c = int(stats.count[i])
        eff = None if logits is None else float(logits.effect[i])
        rec = {"id": i, "count": c, "density": float(density[i]), "max_activation": float(stats.max_act[i]),
               "mean_active_activation": float(mean[i]), "logit_effect": eff, "page": i in paged}
        records.append(rec)
        ident = f"<a href='latents/{i}.html'>{i}</a>" if i in paged else str(i)
        eff_cell = ("<td class='num' data-v='-1'>n/a</td>" if eff is None
                    else f"<td class='num' data-v='{eff!r}'>{_num(eff)}</td>")
        if c == 0:
            rows.append(f"<tr class='dead'><td data-v='{i}'>{ident}</td><td class='dead' data-v='0'>dead</td>"
                        f"<td class='dead' data-v='0'>&ndash;</td><td class='dead' data-v='0'>&ndash;</td>{eff_cell}</tr>")
        else:
            rows.append(f"<tr><td data-v='{i}'>{ident}</td><td class='num' data-v='{rec['density']!r}'>"
                        f"{rec['density']:.3%}</td><td class='num' data-v='{rec['max_activation']!r}'>"
                        f"{_num(rec['max_activation'])}</td><td class='num' data-v='{rec['mean_active_activation']!r}'>"
                        f"{_num(rec['mean_active_activation'])}</td>{eff_cell}</tr>")
    limited = "" if len(paged) == len(live) else f" (pages for the {len(paged):,} most frequent)"
    heads = [("latent", "ascending"), ("density", "descending"), ("max activation", "descending"),
             ("mean active activation", "descending"), ("logit effect", "descending")]
    th = "".join(f"<th data-col='{j}' data-first='{first}' title='sort'>{name}</th>" for j, (name, first) in enumerate(heads))
    body = (f"<h1>Dictionary dashboard</h1><p class='meta'>{header}</p>"
            f"<p>{d:,} latents: {len(live):,} live, {d - len(live):,} dead (never active here){limited}. "
            "Click a column header to sort; click a latent for its contexts.</p>"
            f"<table id='latents'><thead><tr>{th}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>")
    summary = {"model": getattr(lm, "spec", None), "hook": cfg.hook_name, "hook_out": cfg.hook_name_out or None,
               "architecture": cfg.architecture, "d_sae": d, "positions": stats.tokens, "windows": n, "ctx": ctx,
               "skip_first": stats.skip_first, "live": len(live), "pages": len(paged), "latents": records}
    write_json(out / "latents.json", summary)
    index = write_text(out / "index.html", _page("sparsen dashboard", body, SORT_JS))
    return Dashboard(index, d, len(live), len(paged))


def build_dashboard(lm, sae, windows: torch.Tensor, out: str | Path, top_contexts: int = 10, context_radius: int = 12,
                    skip_first: int = 1, max_pages: int | None = None, progress: bool = True,
                    batch_windows: int = 4) -> Path:
    """A static HTML dashboard of ``sae``'s latents on ``windows`` [n, ctx] in folder ``out``; returns index.html.

    ``max_pages`` limits the latent pages to the most frequent live latents (the index lists every latent)."""
    stats = latent_stats(lm, sae, windows, top_contexts, context_radius, skip_first, batch_windows, progress)
    return render_dashboard(lm, sae, windows, stats, out, max_pages, progress).index


__all__ = ["Dashboard", "LatentStats", "LogitEffects", "build_dashboard", "latent_stats", "logit_effects",
           "render_dashboard"]
