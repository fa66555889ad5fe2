"""Screenshot of the explore page (README's bench/explore.png), and the one home of the headless-Chromium
set-up the browser test uses too: Debian's chromium and chromedriver at explicit paths, so Selenium
Manager never runs and nothing is downloaded.

    .venv/bin/fgplugin demo --out demo-out                   # a trained model, its store and catalog
    .venv/bin/python bench/screenshot.py --demo demo-out --out bench/explore.png

Without --demo it indexes 60 generated items with an untrained model (the page, not the ranking, is
what such a shot shows). The PNG is reduced to a 256-colour palette to stay small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync")


def chromium_driver(profile_dir: Path, *, width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium driven through Debian's chromedriver (explicit paths; SE_OFFLINE keeps Selenium
    Manager from the network should anything ask it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        raise RuntimeError("Debian's chromium and chromium-driver are not installed "
                           "(apt-get install -y chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for a in (*CHROME_ARGS, f"--window-size={width},{height}", f"--user-data-dir={profile_dir}"):
        options.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def wait_for(driver: Any, what: str, condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; error box: {driver.find_element('id', 'error').text!r}")


def settled(driver: Any) -> list[str]:
    """Wait until the answer to the page's newest query is shown; return the grid's ids in order."""
    wait_for(driver, "the results", lambda: driver.execute_script(
        "const r = document.getElementById('results');"
        "return state.seq > 0 && r.dataset.seq === String(state.seq) && r.dataset.state !== 'loading';"))
    return driver.execute_script("return Array.from(document.querySelectorAll('#grid .card')).map(c => c.dataset.id);")


def _untrained_store(root: Path) -> tuple[Path, Path, Path | None]:
    from fgplugin import synth
    from fgplugin.export import ExportedEncoder, export_model
    from fgplugin.indexer import index_catalog
    from fgplugin.models import build_model, load_config, save_checkpoint
    from fgplugin.stores import open_store

    catalog = synth.generate(root / "data", 60, seed=3, size=128, workers=1)
    model = build_model(load_config("asen", {"trunk": "resnet_tiny", "image_size": 64}), synth.synth_schema())
    save_checkpoint(root / "ckpt", model)
    export = export_model(root / "ckpt", root / "export")
    with open_store(f"embedded:{root / 'store'}") as st:
        index_catalog(catalog, ExportedEncoder.load(export, device="cpu"), st, workers=1, errors_path=root / "errors.jsonl")
    return root / "store", catalog, root / "ckpt"


def shoot(store_dir: Path, catalog: Path, checkpoint: Path | None, out: Path, *, like: str | None,
          attrs: list[str], work: Path) -> None:  # long: one scripted browser session, step by step
    from selenium.webdriver.common.by import By
    from PIL import Image

    from fgplugin.loading import load_encoder
    from fgplugin.serve import BackgroundServer
    from fgplugin.stores import open_store
    from fgplugin.web.app import catalog_labels, create_app

    with open_store(f"embedded:{store_dir}", read_only=True) as st:
        explainer = load_encoder(checkpoint, device="cpu") if checkpoint else None
        app = create_app(st, labels=catalog_labels(catalog, st), explainer=explainer)
        attrs = attrs or st.require_layout().attributes[:2]
        with BackgroundServer(app) as srv:
            driver = chromium_driver(work / "profile", width=1200, height=860)
            try:
                driver.get(srv.url)
                wait_for(driver, "the page", lambda: driver.execute_script("return document.body.dataset.ready === '1'"))
                items = wait_for(driver, "items", lambda: driver.find_elements(By.CSS_SELECTOR, "#item-list button"))
                for a in st.require_layout().attributes:  # the asked-for attributes only
                    box = driver.find_element(By.ID, f"attr-{a}")
                    if box.is_selected() != (a in attrs):
                        box.click()
                driver.execute_script("arguments[0].value = '0.5'; arguments[0].dispatchEvent(new Event('input'));",
                                      driver.find_element(By.ID, f"weight-{attrs[-1]}"))
                driver.find_element(By.ID, "k").clear()
                driver.find_element(By.ID, "k").send_keys("6")
                if like:
                    driver.find_element(By.ID, "like-id").send_keys(like)
                    driver.find_element(By.ID, "search").click()
                else:
                    items[0].click()
                settled(driver)
                for b in driver.find_elements(By.CSS_SELECTOR, "#query-panel button, #grid .card button")[:3]:
                    if b.is_enabled():
                        b.click()
                time.sleep(1.5)  # attention panels and thumbnails
                driver.execute_script("window.scrollTo(0, 0)")  # the clicks scrolled the buttons into view
                raw = work / "raw.png"
                driver.save_screenshot(str(raw))
            finally:
                driver.quit()
    im = Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    im.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, help="output folder of `fgplugin demo` (store/, data/, run/)")
    p.add_argument("--out", type=Path, default=Path("bench/explore.png"))
    p.add_argument("--like", help="query item id (default: the first item listed)")
    p.add_argument("--attr", action="append", default=[], help="attribute to ask for (repeat; default: the first two)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.demo:
            store, catalog, ckpt = args.demo / "store", args.demo / "data" / "catalog.jsonl", args.demo / "run"
            ckpt = ckpt if ckpt.is_dir() else None
        else:
            store, catalog, ckpt = _untrained_store(work)
        shoot(store, catalog, ckpt, args.out, like=args.like, attrs=args.attr, work=work)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
