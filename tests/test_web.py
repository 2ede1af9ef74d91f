"""The web page in a real headless Chromium (Debian's, driven by playwright; never `playwright install`):
choose a store and a product, a date and promotion, submit, see the predicted units and a chart;
a bad choice shows a clear message."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

@pytest.fixture(scope="module")
def page_server(served_registry, tmp_path_factory):
    home = tmp_path_factory.mktemp("web")/"cd4ml-home"
    with served_registry(home) as served: yield served

def test_forecast_from_the_page(page_server, web_page):
    from cd4ml import features, models
    page, errors = web_page(page_server["base"])
    page.wait_for_function("document.querySelectorAll('#items option').length == 30")
    assert "model version 1" in page.text_content("#model")
    options = page.eval_on_selector_all("#stores option", "os => os.map(o => o.value)")
    assert options[2] == "3 — Cuenca (type C)"
    item = page.eval_on_selector_all("#items option", "os => os.map(o => o.value)")[7]
    assert item == "107 — BREAD/BAKERY"                                # the family is shown
    page.fill("#store", options[2]); page.fill("#item", item); page.fill("#date", "2017-05-04")
    page.check("#promo")
    page.click("#go")
    page.wait_for_selector("#chart rect.target")
    shown = float(page.text_content("#units"))
    ds = page_server["dataset"]
    row = pd.DataFrame({"date": pd.to_datetime(["2017-05-04"]), "store_nbr": [3], "item_nbr": [107], "onpromotion": [True]})
    expected = models.predict(page_server["models"]["1"], features.features_for(ds, row, pd.Timestamp(ds.meta["end"])))[0]
    assert shown == pytest.approx(round(expected, 1), abs=0.051)
    assert "store 3, item 107 on 2017-05-04 (on promotion)" in page.text_content("#what")
    assert page.eval_on_selector_all("#chart rect.actual", "rs => rs.length") == 56
    assert page.eval_on_selector_all("#chart rect.forecast, #chart rect.target", "rs => rs.length") == 16
    assert page.get_attribute("#chart rect.target", "data-date") == "2017-05-04"
    band = page.get_attribute("#chart polygon.band", "points").split()       # v1 has intervals: its 10-90 % band
    assert len(band) == 2 * 16 and page.is_visible("#band-legend") and "10–90 % interval" in page.text_content("#band-legend")
    import cd4ml
    low, high = cd4ml.predict(row, quantiles=[0.1, 0.9])[["0.1", "0.9"]].iloc[0]
    assert f"10–90 % interval {low:.1f} – {high:.1f}" in page.text_content("#range")
    assert page.is_hidden("#message") and not errors
    if os.environ.get("CD4ML_SCREENSHOTS"):                           # opt-in: look at the page as a person would
        page.screenshot(path=str(Path(os.environ["CD4ML_SCREENSHOTS"])/"forecast-page.png"), full_page=True)

def test_quantiles_served_equal_embedded(page_server):
    "`POST /predict` with quantiles (the registry's server) and `cd4ml.predict` give the same numbers; /history the band."
    import cd4ml, httpx
    from cd4ml.release import as_request, catalog_rows
    rows = catalog_rows(page_server["dataset"], 16, 200, seed=4)
    body = httpx.post(f"{page_server['base']}/predict", json={"rows": as_request(rows), "quantiles": [0.1, 0.9]}, timeout=60).json()
    embedded = cd4ml.predict(rows, quantiles=[0.1, 0.9])
    np.testing.assert_allclose(body["predictions"], embedded.prediction, rtol=0, atol=1e-9)
    for q in ("0.1", "0.9"): np.testing.assert_allclose(body["quantiles"][q], embedded[q], rtol=0, atol=1e-9)
    low, mid, high = (np.array(v) for v in (body["quantiles"]["0.1"], body["predictions"], body["quantiles"]["0.9"]))
    assert (low <= mid).all() and (mid <= high).all() and (high > low).mean() > 0.9
    assert "quantiles" not in httpx.post(f"{page_server['base']}/predict", json={"rows": as_request(rows.head(2))}).json()
    h = httpx.get(f"{page_server['base']}/history", params={"store_nbr": 2, "item_nbr": 104}).json()
    days = pd.DataFrame({"date": pd.date_range("2017-05-01", periods=16), "store_nbr": 2, "item_nbr": 104, "onpromotion": False})
    ahead = cd4ml.predict(days, quantiles=[0.1, 0.9])
    assert h["interval"] == [0.1, 0.9]
    np.testing.assert_allclose([f["low"] for f in h["forecast"]], ahead["0.1"], rtol=0, atol=1e-9)
    np.testing.assert_allclose([f["high"] for f in h["forecast"]], ahead["0.9"], rtol=0, atol=1e-9)

def test_bad_choices_show_a_message(page_server, web_page):
    page, _ = web_page(page_server["base"])
    page.wait_for_function("document.querySelectorAll('#items option').length == 30")
    page.fill("#store", "99 — nowhere"); page.fill("#item", "100"); page.click("#go")
    assert 'Unknown store "99 — nowhere"' in page.text_content("#message") and page.is_hidden("#answer")
    page.fill("#store", "1"); page.fill("#item", "pasta"); page.click("#go")
    assert 'Unknown product "pasta"' in page.text_content("#message")
    page.fill("#item", "100"); page.fill("#date", "2017-06-30")
    page.click("#go")
    assert "outside 2017-05-01 … 2017-05-16" in page.text_content("#message") and page.is_hidden("#answer")
    page.fill("#date", "2017-05-02"); page.click("#go")
    page.wait_for_selector("#answer:not([hidden])")
    assert float(page.text_content("#units")) >= 0 and page.is_hidden("#message")
    page.wait_for_selector("#chart-box:not([hidden])")
    page.fill("#item", "0"); page.click("#go")
    assert 'Unknown product "0"' in page.text_content("#message")
    assert page.is_hidden("#answer") and page.is_hidden("#chart-box")   # no stale answer or chart beside the message
