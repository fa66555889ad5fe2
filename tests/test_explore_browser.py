"""The explore page in a real browser: Debian's chromium, headless, driven by Selenium through Debian's
chromedriver (explicit paths; Selenium Manager is never asked, so nothing is downloaded). Loads the page,
picks an item, moves a weight, adds filters and checks after each step that the grid shows exactly the
hits the store gives for the same query; shows an error plainly; saves a screenshot. About 20 s."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("starlette")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (the [test] extra has it)")

from fgplugin.search.spec import QuerySpec, Range, Term, Terms  # noqa: E402
from fgplugin.serve import BackgroundServer  # noqa: E402
from fgplugin.stores import open_store  # noqa: E402
from fgplugin.web.app import catalog_labels, create_app  # noqa: E402

from test_explore_api import explore_store  # noqa: E402

# The Chromium set-up has one home, bench/screenshot.py (the README's screenshot uses it too).
_spec = importlib.util.spec_from_file_location("fgplugin_bench_screenshot",
                                               Path(__file__).resolve().parent.parent / "bench" / "screenshot.py")
shot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shot)
pytestmark = pytest.mark.skipif(
    not (shot.CHROMIUM and shot.CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")


@pytest.fixture()
def page(tmp_path_factory, tmp_path, monkeypatch):
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager may not reach the network either way
    asked = []
    monkeypatch.setattr(SeleniumManager, "binary_paths", lambda self, *a: asked.append(a) or pytest.fail(
        "Selenium Manager was asked for a browser or driver"))
    store_dir, catalog, _ = explore_store(tmp_path_factory.getbasetemp())
    st = open_store(f"embedded:{store_dir}", read_only=True)
    driver = None
    try:
        with BackgroundServer(create_app(st, labels=catalog_labels(catalog, st))) as srv:
            driver = shot.chromium_driver(tmp_path / "profile")
            driver.get(srv.url)
            yield driver, st
    finally:
        if driver is not None:
            driver.quit()
        st.close()
    assert not asked


def store_ids(st, **kw):
    return [h.id for h in st.search(QuerySpec(k=12, **kw)).hits]


def test_pick_weight_filter_in_chromium(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver, st = page
    a1, a2 = st.require_layout().attributes[:2]
    shot.wait_for(driver, "the page", lambda: driver.execute_script("return document.body.dataset.ready === '1'"))
    items = shot.wait_for(driver, "the item list", lambda: driver.find_elements(By.CSS_SELECTOR, "#item-list button"))
    like = items[4].get_attribute("data-id")

    # pick an item with the keyboard: the grid is the store's answer for the first attribute
    items[4].send_keys(Keys.ENTER)
    first = shot.settled(driver)
    assert first == store_ids(st, attributes={a1: 1.0}, like_id=like) and len(first) == 12
    assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None

    # move a weight with the keyboard: add the second attribute, its slider from 1.00 down to 0.80
    driver.find_element(By.ID, f"attr-{a2}").send_keys(Keys.SPACE)
    shot.settled(driver)
    slider = driver.find_element(By.ID, f"weight-{a2}")
    for _ in range(4):
        slider.send_keys(Keys.ARROW_LEFT)
    assert driver.find_element(By.ID, f"wout-{a2}").text == "0.80"
    weighted = shot.settled(driver)
    assert weighted == store_ids(st, attributes={a1: 1.0, a2: 0.8}, like_id=like)

    # add filters: a price bound (typed, Enter submits), in stock only, two brands from the picker
    prices = driver.execute_script("return Array.from(document.querySelectorAll('#grid .card')).map(c => "
                                   "Number(Array.from(c.querySelectorAll('td')).find((t, i, all) => "
                                   "all[i - 1] && all[i - 1].textContent === 'price').textContent));")
    bound = sorted(prices)[len(prices) // 2]
    box = driver.find_element(By.ID, "f-price-max")
    box.send_keys(str(bound))
    box.send_keys(Keys.ENTER)
    bounded = shot.settled(driver)
    assert bounded == store_ids(st, attributes={a1: 1.0, a2: 0.8}, like_id=like, filters=[Range("price", lte=bound)])
    assert bounded != weighted  # the hits above the bound left the grid
    driver.find_element(By.ID, "f-in_stock-true").send_keys(Keys.SPACE)
    picker = Select(driver.find_element(By.ID, "f-brand"))
    shot.wait_for(driver, "the brand picker", lambda: len(picker.options) > 2)
    brands = [o.get_attribute("value") for o in picker.options[:2]]
    for b in brands:
        picker.select_by_value(b)
    filtered = shot.settled(driver)
    want = store_ids(st, attributes={a1: 1.0, a2: 0.8}, like_id=like,
                     filters=[Range("price", lte=bound), Term("in_stock", True), Terms("brand", tuple(brands))])
    assert filtered == want and len(want) < 12

    # each card shows its image, score, cosines and labels
    card = driver.find_element(By.CSS_SELECTOR, "#grid .card")
    assert driver.execute_script("return arguments[0].querySelector('img').naturalWidth", card) > 0
    assert a1 in card.text and f"{a2} label" in card.text
    driver.save_screenshot(str(tmp_path / "explore.png"))
    assert (tmp_path / "explore.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # upload a photo of an item (the filters stay): the item itself comes first, the id field is cleared
    driver.find_element(By.ID, "photo").send_keys(st.image_of(filtered[0]))
    shot.wait_for(driver, "the photo query", lambda: driver.execute_script("return state.photo !== null"))
    assert shot.settled(driver)[0] == filtered[0] and driver.find_element(By.ID, "like-id").get_attribute("value") == ""
    driver.find_element(By.ID, "clear-photo").click()

    # an unknown id, typed and submitted with Enter, is reported plainly
    field = driver.find_element(By.ID, "like-id")
    field.clear()
    field.send_keys("no-such-item", Keys.ENTER)
    shot.settled(driver)
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed() and "no item with id 'no-such-item'" in error.text

