"""The HTML report, opened in a real headless browser: its plots load and its text renders."""

import shutil
import subprocess

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless Chromium is needed for the report test: `make test` installs Debian's chromium"
    return exe


def screenshot(page, out, tmp_path, size=(1200, 900)):
    subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                    f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    return mpimg.imread(out)[..., :3]


@pytest.mark.parametrize("broken", [False, True])
def test_report_page_shows_its_plot_and_text_in_a_browser(tmp_path, broken):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsen.io import save_figure
    from sparsen.report import write_report

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([0, 1, 2], [0, 2, 1], color="#ff0000", lw=8)
    save_figure(fig, tmp_path / "plot.png")
    if broken:  # the check must notice a plot that does not load
        (tmp_path / "plot.png").unlink()
    page = write_report(tmp_path, [("Quality", "dense ppl 20.00\nteal 29.76", ["plot.png"])])
    img = screenshot(page, tmp_path / "shot.png", tmp_path)
    red = ((img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)).mean()
    dark = (img.max(-1) < 0.3).mean()
    assert dark > 0.001  # the title and the table text rendered
    if broken:
        assert red < 1e-4
    else:
        assert red > 0.002, red  # the plot's red line is on screen
