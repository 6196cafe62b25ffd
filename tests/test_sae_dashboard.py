"""The dictionary dashboard (`sparsen sae dashboard`): its streamed statistics against a brute-force pass, and its
pages opened in a real headless Chromium driven by Selenium (Debian's chromium + chromium-driver): no console errors,
nothing fetched, links that open the latent's page, headers that sort, token text escaped, screenshots not blank.
The report page of `sparsen demo` gets the same browser check."""

import io
import json
import shutil
import time

import pytest
import torch

from sparsen.cli import main
from sparsen.data import corpus_windows
from sparsen.models.hookpoints import hook_point, read_activations
from sparsen.sae import build_sae, sae_config
from sparsen.sae.dashboard import HIST_BINS, build_dashboard, latent_stats, logit_effects
from sparsen.sae.formats import save_saelens

INSTALL = "`make test` installs them (Debian's chromium and chromium-driver, and selenium from the dev extras)"
D_SAE, DEAD, MAX_PAGES = 48, (0, 1, 2), 40


# --- the browser ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL}")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_exe = shutil.which("chromedriver")
    if not exe or not driver_exe:
        pytest.fail(f"the browser tests need headless Chromium and chromedriver (found {exe}, {driver_exe}): {INSTALL}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--window-size=1200,900", f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_exe), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def console_errors(driver) -> list[str]:
    """The SEVERE entries of the console log since the last call: console.error, uncaught exceptions, resources
    that failed to load."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, path):
    driver.get(path.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    errors = console_errors(driver)
    assert not errors, f"{path.name}: {errors}"
    # everything inline: the page itself is the only thing loaded (no CDN, no image, no stylesheet)
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0, path


def wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the browser"
        time.sleep(0.05)


def screenshot(driver, path):
    """Save a screenshot and return it as an [h, w, 3] float array in [0, 1]."""
    import matplotlib.image as mpimg

    assert driver.save_screenshot(str(path))
    return mpimg.imread(io.BytesIO(path.read_bytes()), format="png")[..., :3]


def assert_not_blank(img, what):
    ink = (img.min(-1) < 0.6).mean()  # dark or coloured pixels: text, table rules, shading, plots
    assert ink > 0.003 and img.std() > 0.02, f"{what} screenshot looks blank (ink {ink:.4f}, std {img.std():.4f})"


def test_the_console_check_notices_a_script_error(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><title>broken</title><p>x</p><script>notDefined()</script>")
    browser.get(page.as_uri())
    assert any("notDefined" in e for e in console_errors(browser))


# --- the dashboard ----------------------------------------------------------------------------------------------------
def seeded_topk(lm, hook="blocks.1.hook_resid_post", d_in=64):
    sae = build_sae(sae_config("topk", d_in=d_in, d_sae=D_SAE, k=4, hook_name=hook, model="tiny-llama",
                               model_fingerprint=lm.fingerprint))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, D_SAE, generator=g))
        sae.W_dec.copy_(torch.randn(D_SAE, d_in, generator=g) / 8)
        sae.b_enc.normal_(0, 1, generator=g)
        sae.b_enc[list(DEAD)] = -1e4  # never among the top 4: dead
    return sae


@pytest.fixture(scope="module")
def dash(tiny_llama, tmp_path_factory):
    lm = tiny_llama
    sae = seeded_topk(lm)
    wins = corpus_windows(lm.tokenizer, "wikitext2-test", 48, 24, bos=lm.window_bos)
    out = tmp_path_factory.mktemp("dash")
    index = build_dashboard(lm, sae, wins, out, top_contexts=6, context_radius=5, max_pages=MAX_PAGES, progress=False,
                            batch_windows=3)
    return {"lm": lm, "sae": sae, "windows": wins, "index": index, "data": json.loads((out / "latents.json").read_text())}


def test_streamed_statistics_equal_a_brute_force_pass(dash):
    lm, sae, wins = dash["lm"], dash["sae"], dash["windows"]
    s = latent_stats(lm, sae, wins, top_contexts=6, context_radius=5, skip_first=1, batch_windows=5, progress=False)
    with torch.no_grad():
        x = read_activations(lm.adapter, wins, [hook_point(lm.adapter, sae.cfg.hook_name)])[sae.cfg.hook_name]
        f = sae.encode(x)
    f[:, :1] = 0
    flat = f[:, 1:].reshape(-1, D_SAE)
    assert s.tokens == flat.shape[0] == 24 * 47
    assert torch.equal(s.count, (flat != 0).sum(0)) and torch.equal(s.hist.sum(1), s.count)
    assert set(torch.nonzero(s.count == 0).flatten().tolist()) == set(DEAD)
    assert torch.allclose(s.max_act, flat.max(0).values) and torch.allclose(s.sum_act.float(), flat.sum(0), rtol=1e-5)
    for lat in range(D_SAE):
        col = flat[:, lat]
        nz = col[col != 0].double()
        want = col.abs().topk(6).values
        want = want[want > 0]
        assert torch.allclose(s.top_act[lat, :len(want)].abs(), want), lat
        for act, where, around in zip(s.top_act[lat], s.top_where[lat], s.top_context[lat]):
            if act == 0:
                continue
            w, pos = divmod(int(where), 48)
            assert f[w, pos, lat] == act
            for off in range(-5, 6):
                assert around[off + 5] == (f[w, pos + off, lat] if 0 <= pos + off < 48 else 0)
        if len(nz):  # the streamed, rebinned histogram is the one binned at the final width in one go
            e = int(s.hist_exp[lat])
            bins = torch.floor(nz / 2.0 ** e).long().clamp(-HIST_BINS, HIST_BINS - 1) + HIST_BINS
            assert torch.equal(torch.bincount(bins, minlength=2 * HIST_BINS), s.hist[lat]), lat
            assert HIST_BINS / 2 * 2.0 ** e <= nz.abs().max() < HIST_BINS * 2.0 ** e  # the range is well used
    recs = dash["data"]["latents"]
    assert [r["count"] for r in recs] == s.count.tolist()  # the dashboard's numbers (other batches) are the same


def test_logit_effects_are_the_heads_linear_map_of_the_decoder_direction(dash, tiny_llama):
    lm = tiny_llama
    ad = lm.adapter
    for hook, d_in in (("blocks.1.hook_resid_post", 64), ("blocks.2.attn.hook_z", ad.n_heads * ad.head_dim)):
        sae = seeded_topk(lm, hook, d_in)
        eff = logit_effects(lm, sae)
        with torch.no_grad():
            resid = sae.W_dec if hook.endswith("resid_post") else ad.blocks[2].linears["o"](sae.W_dec)
            # the head normalises by rms; undo it to get its linear part: (v * gain) @ W_U.T
            logits = ad.head(resid) * (resid.pow(2).mean(-1, keepdim=True) + ad.norm_eps).sqrt()
        assert torch.allclose(eff.effect, logits.abs().amax(1), rtol=1e-4), hook
        assert torch.equal(eff.top_ids, logits.topk(10, dim=1).indices), hook
        assert torch.equal(eff.bottom_ids, logits.topk(10, dim=1, largest=False).indices), hook


def test_index_lists_every_latent_and_its_headers_sort(dash, browser, tmp_path):
    from selenium.webdriver.common.by import By

    data = dash["data"]
    recs = data["latents"]
    live = [r for r in recs if r["count"] > 0]
    assert len(live) > MAX_PAGES and data["pages"] == MAX_PAGES  # some live latents have no page
    open_page(browser, dash["index"])
    assert browser.title == "sparsen dashboard"
    rows = browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    assert len(rows) == D_SAE
    ids = lambda n: [int(r.find_element(By.CSS_SELECTOR, "td").text) for r in
                     browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")[:n]]
    assert ids(D_SAE) == list(range(D_SAE))
    for i in DEAD:
        cells = rows[i].find_elements(By.CSS_SELECTOR, "td")
        assert cells[1].text == "dead" and not cells[0].find_elements(By.TAG_NAME, "a")
    links = browser.find_elements(By.CSS_SELECTOR, "#latents a")
    paged = sorted(r["id"] for r in sorted(live, key=lambda r: (-r["count"], r["id"]))[:MAX_PAGES])
    assert sorted(int(a.text) for a in links) == paged == [r["id"] for r in recs if r["page"]]
    assert_not_blank(screenshot(browser, tmp_path / "index.png"), "index")

    def click(col):
        browser.find_element(By.CSS_SELECTOR, f"th[data-col='{col}']").click()

    by = lambda key, sign: [r["id"] for r in sorted(recs, key=lambda r: (sign * r[key], r["id"]))][:8]
    click(1)  # density: most frequent first
    assert ids(8) == by("count", -1)
    assert browser.find_element(By.CSS_SELECTOR, "th[data-col='1']").get_attribute("aria-sort") == "descending"
    click(1)  # again: least frequent first, the dead ones (by id) on top
    assert ids(8) == by("count", 1) and ids(3) == list(DEAD)
    click(4)  # logit effect, largest first
    assert ids(8) == by("logit_effect", -1)
    click(2)
    assert ids(8) == by("max_activation", -1)
    click(0)  # back to id order
    assert ids(D_SAE) == list(range(D_SAE))
    assert not console_errors(browser)


def test_a_latent_link_opens_its_page_with_highlighted_contexts(dash, browser, tmp_path):
    from selenium.webdriver.common.by import By

    recs = dash["data"]["latents"]
    top = max(recs, key=lambda r: (r["count"], -r["id"]))["id"]
    open_page(browser, dash["index"])
    browser.find_element(By.CSS_SELECTOR, f"#latents a[href='latents/{top}.html']").click()
    wait_for(lambda: browser.title.startswith(f"Latent {top} "))
    assert browser.current_url.endswith(f"/latents/{top}.html")
    assert not console_errors(browser)
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Latent {top}"
    contexts = browser.find_elements(By.CSS_SELECTOR, ".ctx")
    assert len(contexts) == 6  # top_contexts
    for c in contexts:
        marked = c.find_elements(By.CSS_SELECTOR, ".t.max")
        assert len(marked) == 1 and marked[0].get_attribute("style").startswith("background")
        assert float(marked[0].get_attribute("title")) == pytest.approx(float(c.find_element(By.CSS_SELECTOR, ".a").text),
                                                                        rel=1e-3)
    shaded = browser.find_elements(By.CSS_SELECTOR, ".ctx .t[style]")
    assert len(shaded) >= 6 and all(float(t.get_attribute("title")) != 0 for t in shaded)
    first = float(contexts[0].find_element(By.CSS_SELECTOR, ".a").text)
    assert first == pytest.approx(recs[top]["max_activation"], rel=1e-3)  # the top context holds the maximum
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg rect")) > 1  # the histogram
    assert len(browser.find_elements(By.CSS_SELECTOR, ".logits tbody tr")) == 20  # 10 raised, 10 lowered
    assert_not_blank(screenshot(browser, tmp_path / "latent.png"), "latent page")
    browser.find_element(By.LINK_TEXT, "\u2190 all latents").click()
    wait_for(lambda: browser.title == "sparsen dashboard")
    for r in recs:  # every page loads cleanly
        if r["page"]:
            open_page(browser, dash["index"].parent / "latents" / f"{r['id']}.html")


class MarkupTokenizer:
    """A tokenizer whose tokens are markup: what a real BPE vocabulary holds ('<a', '</', '&amp;', quotes)."""

    MARKUP = ["<b>bold</b>", "<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "&amp;", "\"'", "</span>"]

    def __init__(self, inner):
        self.inner = inner

    def decode(self, ids):
        return "".join(self.MARKUP[i % len(self.MARKUP)] if i % 7 == 0 else self.inner.decode([i]) for i in ids)


def test_token_text_is_escaped_not_markup(tiny_llama, browser, tmp_path):
    from types import SimpleNamespace

    from selenium.webdriver.common.by import By

    lm = SimpleNamespace(adapter=tiny_llama.adapter, tokenizer=MarkupTokenizer(tiny_llama.tokenizer), spec="tiny-llama")
    wins = (torch.arange(7 * 30) % 95 + 32).view(7, 30)  # printable bytes; every 7th id is markup
    index = build_dashboard(lm, seeded_topk(tiny_llama), wins, tmp_path / "esc", top_contexts=3, context_radius=8,
                            progress=False)
    pages = sorted((tmp_path / "esc" / "latents").iterdir())
    assert pages
    for page in pages:
        open_page(browser, page)  # an alert() would also stop the driver here
        assert browser.execute_script("return document.scripts.length + document.images.length") == 0
        assert not browser.find_elements(By.CSS_SELECTOR, "b, .ctx span span")
        contexts = browser.execute_script(  # each token's text, as the browser shows it, is its decoded text
            "return Array.from(document.querySelectorAll('.ctx')).map(c => [+c.dataset.window, +c.dataset.pos, "
            "Array.from(c.querySelectorAll('.t')).map(t => t.textContent)])")
        assert contexts
        for w, pos, shown in contexts:
            first = max(0, pos - 8)
            assert shown == [lm.tokenizer.decode([int(i)]) for i in wins[w, first:first + len(shown)]]
    assert any("<script>" in t.text for t in browser.find_elements(By.CSS_SELECTOR, ".ctx, .logits td"))
    open_page(browser, index)


def test_cli_dashboard_and_its_refusals(tiny_llama, tmp_path, capsys):
    save_saelens(seeded_topk(tiny_llama), tmp_path / "sae")
    out = tmp_path / "site"
    base = ["sae", "dashboard", "--model", "tiny-llama", "--sae", str(tmp_path / "sae"), "--ctx", "32", "--tokens",
            "600", "--top-contexts", "3", "--quiet"]
    assert main([*base, "--max-pages", "5", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("topk on blocks.1.hook_resid_post: 48 latents") and "5 pages written" in line, line
    assert str(out / "index.html") in line and len(list((out / "latents").iterdir())) == 5
    assert json.loads((out / "latents.json").read_text())["positions"] == 20 * 31

    assert main([*base[:3], "tiny-qwen2", *base[4:], "--out", str(tmp_path / "a")]) == 2
    assert "trained on model 'tiny-llama'" in capsys.readouterr().err
    bad = seeded_topk(tiny_llama, hook="blocks.7.hook_resid_post")
    save_saelens(bad, tmp_path / "bad")
    assert main([*base[:5], str(tmp_path / "bad"), *base[6:], "--out", str(tmp_path / "b")]) == 2
    assert "unknown hook 'blocks.7.hook_resid_post'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file" / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write output" in err, err
    assert not any((tmp_path / n).exists() for n in ("a", "b"))


# --- the demo report, the same browser check ----------------------------------------------------------------------------
def test_report_page_loads_cleanly_in_a_browser(browser, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsen.io import save_figure
    from sparsen.report import write_report

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0, 1, 2], [0, 2, 1], color="#ff0000", lw=6)
    save_figure(fig, tmp_path / "plot.png")
    page = write_report(tmp_path, [("Quality", "dense ppl 20.00\nteal 29.76 <&>", ["plot.png"])])
    browser.get(page.as_uri())
    assert not console_errors(browser)
    assert browser.title == "sparsen report"
    assert browser.execute_script("var i = document.images[0]; return i.complete && i.naturalWidth > 0")
    assert "teal 29.76 <&>" in browser.find_element("tag name", "pre").text
    img = screenshot(browser, tmp_path / "report.png")
    assert_not_blank(img, "report")
    assert ((img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)).mean() > 0.001  # the plot's red line
    (tmp_path / "plot.png").unlink()  # a plot that does not load is a console error
    browser.get(page.as_uri())
    assert any("plot.png" in e for e in console_errors(browser))
