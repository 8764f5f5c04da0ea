"""The feature dashboard (sae_diff.dashboard + templates/dashboard.html) in a real browser.

A small site is written with ``write_site`` from hand-made documents (three SAEs of layer 3: one
with 300 features so pagination matters, one with a note and a page whose lineage links back, one
empty) and opened from disk (``file://``, no server) in Debian's Chromium, driven by Playwright.
Every test also checks that the page raised no console error or uncaught exception and asked for
nothing but local files. Skipped only where there is no browser: no ``playwright`` package, or no
``/usr/bin/chromium`` and no way to install it (root and apt-get).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sae_diff.dashboard import SCHEMA, TEMPLATE, write_site

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the playwright package is not importable (it comes with the lock, requirements/cpu.lock)",
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
A, B, C = "M0_D0/layer3/topk", "M1_D1/layer3/topk", "M2_D2/layer3/topk"
N_A, N_B = 300, 40
PAGES_A, PAGES_B = (5, 42, 250), (7,)
LABELS = ["same", "changed", "born", "died", "reverted"]
WORDS = ["she", "he", "the", "cat", "run", "blue", "<!--<script>"]  # the last: must not break the page
XSS = '<img src=x onerror="window.__xss = 1">'
BINS = 12
NULLS = [f for f in range(N_A) if f % 50 == 7]


# ---------- the documents ----------


def freq(f: int) -> float | None:
    """Distinct firing rates (37 is invertible mod 301), none for every 50th feature from 7."""
    return None if f % 50 == 7 else ((f * 37) % 301) / 1000


def example(sample_id: int, tokens: list[str], acts: list[float]) -> dict:
    at = max(range(len(acts)), key=lambda i: acts[i])
    return {
        "sample_id": sample_id,
        "position": 10 + at,
        "activation": acts[at],
        "tokens": tokens,
        "acts": acts,
        "at": at,
    }


TOP = [
    example(4, ["Tell", " a", " two", "-", "line", "\n", "story"], [0.0, 0.0, 1.2, 3.88, 0.5, 0.0, 0.1]),
    example(9, ["She", " said", " hi"], [2.5, 0.0, 0.3]),
    example(11, [" her", " own", "\t", "way"], [0.0, 4.0, 0.0, 0.2]),
]
QUANTILES = [
    {"label": "40–60% of max", "examples": [example(20, ["a", " b", " c"], [0.0, 2.0, 0.0])]},
    {"label": "0–20% of max", "examples": [example(21, ["x", " y"], [0.4, 0.0]), example(22, ["z"], [0.3])]},
]


def step(cell: str, feature: int | None, label: str, tokens: list[str]) -> dict:
    return {
        "cell": cell,
        "key": f"{cell}/layer3/topk",
        "feature": feature,
        "label": label,
        "freq": None if feature is None else 0.01,
        "cos_prev": None if label == "origin" else 0.62,
        "cos_origin": 1.0 if label == "origin" else 0.55,
        "top": [] if feature is None else [example(1, tokens, [0.0, 1.0, 2.0][: len(tokens)])],
    }


LINEAGES = [
    {
        "branch": "MXDX",
        "lineage": 17,
        "steps": [
            step("M0_D0", 42, "origin", ["her", " own", " way"]),
            step("M1_D1", 7, "changed", ["his", " own", " way"]),
            step("M2_D2", None, "died", []),
        ],
    },
    # M1_D0 is not in the site: its step is shown, not linked
    {"branch": "MXD0", "lineage": 3, "steps": [step("M0_D0", 42, "origin", ["her"]), step("M1_D0", 9, "same", ["a"])]},
]


def full_page(feature: int, lineages: list[dict]) -> dict:
    return {
        "feature": feature,
        "why": ["probe rank 1 (female_ratio)", "born at M1_D1 (MXDX)"],
        "stats": {"freq": 0.01, "mean_act": 1.2, "max_act": 4.0, "fire_count": 120, "top_token": " her"},
        "histogram": {
            "edges": [i * 4.0 / BINS for i in range(BINS + 1)],
            "counts": [50, 30, 20, 0, 8, 5, 3, 2, 1, 0, 0, 1],
        },
        "top": TOP,
        "quantiles": QUANTILES,
        "logit_lens": {"promoted": [[" her", 1.2], ["\n", 0.9]], "suppressed": [[" him", -1.1]]},
        "lineages": lineages,
        "figures": [{"title": "lineage", "href": "../figures/lineage.png"}],
    }


def document(key: str, n: int, pages: dict, notes: list[str]) -> dict:
    cell, layer, sae = key.split("/")
    columns = [
        ("feature", "feature", "int"),
        ("freq", "firing rate", "float"),
        ("label_MXDX", "MXDX label", "str"),
        ("top_token", "top token", "str"),
        ("page", "page", "bool"),
    ]
    rows = [[f, freq(f), LABELS[f % 5], XSS if f == 3 else WORDS[f % len(WORDS)], str(f) in pages] for f in range(n)]
    return {
        "schema": SCHEMA,
        "key": key,
        "cell": cell,
        "model": cell.split("_")[0],
        "data": cell.split("_")[1],
        "layer": int(layer.removeprefix("layer")),
        "sae": sae,
        "d_sae": n,
        "columns": [{"name": a, "label": b, "type": c} for a, b, c in columns],
        "rows": rows,
        "pages": pages,
        "figures": [{"title": "firing rates", "href": "../figures/freq.png"}],
        "notes": notes,
    }


def documents() -> list[dict]:
    minimal = {"feature": 250, "why": [], "stats": {"freq": None}, "top": []}  # no histogram, lineage, lens
    pages_a = {"42": full_page(42, LINEAGES), "5": full_page(5, []), "250": minimal}
    pages_b = {"7": full_page(7, [LINEAGES[0]])}
    return [
        document(A, N_A, pages_a, []),
        document(B, N_B, pages_b, ["unconverged: training stopped at the step limit"]),
        document(C, 0, {}, []),
    ]


# ---------- the browser ----------


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium, installed with apt-get when missing (root only)."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"no {CHROMIUM}, and it cannot be installed here (needs root and apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        assert CHROMIUM.exists(), f"apt-get installed chromium but {CHROMIUM} is missing"
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dashboard") / "site"
    index = write_site(folder, documents(), title="test features")
    assert [e["key"] for e in index["saes"]] == [A, B, C]
    return folder


class Session:
    """One browser context; records console errors, uncaught exceptions and non-local requests."""

    def __init__(self, browser, site: Path):
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.context.set_default_timeout(10_000)
        self.url = (site / "index.html").as_uri()
        self.errors: list[str] = []
        self.requests: list[str] = []

    def open(self, fragment: str = ""):
        page = self.context.new_page()
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.goto(self.url + (f"#{fragment}" if fragment else ""))
        return page

    def assert_clean(self):
        assert self.errors == []
        assert [u for u in self.requests if not u.startswith(("file:", "data:"))] == []


@pytest.fixture
def session(browser, site):
    s = Session(browser, site)
    yield s
    s.context.close()


def features(page) -> list[int]:
    return [
        int(x) for x in page.locator("[data-testid=feature-row]").evaluate_all("rs => rs.map(r => r.dataset.feature)")
    ]


def by_freq(selected, descending: bool = False) -> list[int]:
    """The table's order when sorted by firing rate: numeric, ties by feature id, nulls last."""
    present = sorted((f for f in selected if freq(f) is not None), key=freq, reverse=descending)
    return present + [f for f in selected if freq(f) is None]


def count(page) -> str:
    return page.get_by_test_id("count").inner_text()


# ---------- the tests ----------


def test_table_sorts_filters_and_paginates(session):
    """The first SAE's table: all 300 rows counted, 100 a page; sorting by a float column is numeric
    with nulls last both ways; the filter matches label text or an exact feature id; "full pages
    only"; the selector lists every SAE; data strings are inserted as text (no markup runs)."""
    page = session.open()
    table = page.get_by_test_id("feature-table")
    table.wait_for()
    assert count(page) == f"{N_A} of {N_A} features"
    assert features(page) == list(range(100))
    assert page.get_by_test_id("sae-select").locator("option").count() == 3
    assert page.get_by_test_id("sae-select").input_value() == A
    # a label with markup stays text
    assert page.locator("main img").count() == 0 and page.evaluate("window.__xss") is None
    assert page.locator("td", has_text="onerror").count() == 1

    header = table.locator("th[data-column=freq]")
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert features(page) == by_freq(range(N_A))[:100]
    header.click()  # reversed; nulls still last
    assert header.get_attribute("aria-sort") == "descending"
    assert features(page) == by_freq(range(N_A), descending=True)[:100]
    page.get_by_test_id("next").click()
    page.get_by_test_id("next").click()
    assert page.get_by_test_id("page-info").inner_text() == "page 3 of 3"
    assert features(page) == by_freq(range(N_A), descending=True)[200:]
    assert [freq(f) for f in features(page)][-len(NULLS) :] == [None] * len(NULLS)
    assert page.get_by_test_id("next").is_disabled()

    search = page.get_by_test_id("filter")
    search.fill("born")
    assert count(page) == f"{N_A // 5} of {N_A} features"
    assert features(page) == by_freq([f for f in range(N_A) if LABELS[f % 5] == "born"], descending=True)
    search.fill("42")
    assert features(page) == [42] and count(page) == f"1 of {N_A} features"
    search.fill("")
    page.get_by_test_id("pages-only").check()
    assert count(page) == f"{len(PAGES_A)} of {N_A} features"
    assert sorted(features(page)) == sorted(PAGES_A)
    session.assert_clean()


def test_clicking_a_row_opens_the_feature_page(session):
    """Clicking feature 42's row routes to #<key>/42: the why-lines, one token <span> per example
    token (text faithful, whitespace marked, the max token class "max", shading opaque for the max
    and transparent for act 0), one histogram bar per bin, each lineage branch with its steps and
    their examples in side-by-side columns; Escape goes back to the table with the row focused."""
    page = session.open()
    page.locator("[data-testid=feature-row][data-feature='42']").click()
    view = page.get_by_test_id("feature-page")
    view.wait_for()
    assert page.evaluate("location.hash") == f"#{A}/42"
    assert view.get_attribute("data-feature") == "42"
    assert page.get_by_test_id("why").locator("li").all_inner_texts() == full_page(42, [])["why"]

    examples = view.locator("[data-testid=examples-top] [data-testid=example]")
    assert examples.count() == len(TOP)
    for i, ex in enumerate(TOP):
        tokens = examples.nth(i).get_by_test_id("token")
        assert tokens.count() == len(ex["tokens"])
        assert tokens.evaluate_all("ts => ts.map(t => t.textContent)") == ex["tokens"]  # faithful text
        assert [float(a) for a in tokens.evaluate_all("ts => ts.map(t => t.dataset.act)")] == ex["acts"]
        assert examples.nth(i).locator(".max").count() == 1
        assert tokens.nth(ex["at"]).get_attribute("class").split() == ["tok", "max"]
    background = "ts => ts.map(t => getComputedStyle(t).backgroundColor)"
    shades = examples.nth(0).get_by_test_id("token").evaluate_all(background)
    assert shades[TOP[0]["at"]] not in ("rgba(0, 0, 0, 0)", "transparent")
    assert shades[0] == "rgba(0, 0, 0, 0)"  # act 0
    # the newline token shows a marker (↵) and keeps its "\n"
    assert examples.nth(0).get_by_test_id("token").nth(5).locator(".ws").get_attribute("data-ch") == "\u21b5"

    n_tokens = sum(len(e["tokens"]) for e in TOP) + sum(len(e["tokens"]) for q in QUANTILES for e in q["examples"])
    n_tokens += sum(len(e["tokens"]) for lin in LINEAGES for s in lin["steps"] for e in s["top"])
    assert view.get_by_test_id("token").count() == n_tokens
    assert view.get_by_test_id("quantile").count() == len(QUANTILES)
    assert view.get_by_test_id("histogram").locator("rect").count() == BINS

    lineages = view.get_by_test_id("lineage")
    assert lineages.evaluate_all("ls => ls.map(l => l.dataset.branch)") == [lin["branch"] for lin in LINEAGES]
    for i, lin in enumerate(LINEAGES):
        steps = lineages.nth(i).get_by_test_id("lineage-step")
        assert steps.count() == len(lin["steps"])
        assert steps.evaluate_all("ss => ss.map(s => s.dataset.cell)") == [s["cell"] for s in lin["steps"]]
        columns = lineages.nth(i).get_by_test_id("lineage-column")
        assert columns.count() == len(lin["steps"])
        boxes = [columns.nth(k).bounding_box() for k in range(columns.count())]
        assert all(b["y"] == boxes[0]["y"] for b in boxes)  # side by side
        assert all(a["x"] + a["width"] <= b["x"] for a, b in zip(boxes, boxes[1:]))
    # in the site and present: linked; this page and M1_D0 (not in the site) and absent steps: not
    assert lineages.nth(0).get_by_test_id("lineage-link").count() == 1
    assert lineages.nth(1).get_by_test_id("lineage-link").count() == 0

    page.keyboard.press("Escape")
    page.get_by_test_id("feature-table").wait_for()
    assert page.evaluate("location.hash") == f"#{A}"
    assert page.evaluate("document.activeElement.dataset.feature") == "42"
    page.keyboard.press("Enter")  # the focused row opens again
    view.wait_for()
    assert page.evaluate("location.hash") == f"#{A}/42"
    session.assert_clean()


def test_lineage_step_link_loads_the_other_sae(session):
    """A fragment URL opens feature 42 directly; its MXDX lineage step in M1_D1 links to that SAE's
    page, whose data is parsed only then; there the notes show and the step back is linked."""
    page = session.open(f"{A}/42")
    page.get_by_test_id("feature-page").wait_for()
    loaded = "window.SAE_DIFF.loaded().sort()"
    assert page.evaluate(loaded) == [A]  # the other SAEs' data is parsed when first shown
    page.get_by_test_id("lineage").first.get_by_test_id("lineage-link").click()
    view = page.locator(f"[data-testid=feature-page][data-key='{B}']")
    view.wait_for()
    assert page.evaluate("location.hash") == f"#{B}/7"
    assert view.get_attribute("data-feature") == "7"
    assert page.evaluate(loaded) == [A, B]
    assert page.get_by_test_id("sae-select").input_value() == B
    assert "unconverged" in view.get_by_test_id("notes").inner_text()
    back = view.get_by_test_id("lineage-link")
    assert back.count() == 1 and back.get_attribute("href") == f"#{A}/42"
    assert view.locator("tr.current").get_attribute("data-cell") == "M1_D1"
    page.go_back()
    page.locator(f"[data-testid=feature-page][data-key='{A}']").wait_for()
    session.assert_clean()


def test_fragments_edge_cases_and_screenshot(session, tmp_path):
    """Direct fragment URLs: a feature without a page shows its row and the "no full page" line; a
    page without histogram or lineage; an empty SAE's table; an unknown address; the SAE selector
    switches tables; the bare template says it has no data. A 1280x800 screenshot of a full page is saved."""
    page = session.open(f"{B}/12")
    view = page.get_by_test_id("feature-page")
    view.wait_for()
    assert "no full page: not among the labelled, top-ranked or tested features" in view.inner_text()
    assert "firing rate" in view.inner_text()

    page = session.open(f"{A}/250")
    view = page.get_by_test_id("feature-page")
    view.wait_for()
    assert "no histogram" in view.inner_text() and view.get_by_test_id("lineage").count() == 0

    page = session.open(C)
    page.get_by_test_id("feature-table").wait_for()
    assert count(page) == "0 of 0 features"
    page.get_by_test_id("sae-select").select_option(B)
    page.locator(f"[data-testid=table-view][data-key='{B}']").wait_for()
    assert count(page) == f"{N_B} of {N_B} features"
    assert "unconverged" in page.get_by_test_id("notes").inner_text()

    page = session.open("nowhere/layer9/x/1")
    assert "Nothing at #nowhere/layer9/x/1" in page.locator("main .error").inner_text()
    page = session.context.new_page()  # the template itself, before write_index put data into it
    page.goto(TEMPLATE.as_uri())
    assert "no data in this page" in page.locator("main .error").inner_text()

    page = session.open(f"{A}/42")
    page.get_by_test_id("histogram").wait_for()
    shot = tmp_path / "feature.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.exists() and shot.stat().st_size > 20_000
    session.assert_clean()
