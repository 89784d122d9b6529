"""The API docs in a real browser, offline: Swagger UI at /docs and ReDoc at /redoc are
served from the assets fastapi-offline ships, and work with every request that is not to
the service on 127.0.0.1 blocked.

Debian's Chromium (apt-get installs it when missing) is driven by Playwright against the
service started as users start it (`agentserve serve`); screenshots go to reports/.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import REPORTS, TIMEOUT_MS, DocsBrowser, Service

pytestmark = pytest.mark.integration

ABSOLUTE_URL = re.compile(r"""(?:[a-z][a-z0-9+.-]*:)?//[^\s"'<>)]+""", re.IGNORECASE)
"""An absolute URL (`https://host/...`) or a scheme-relative one (`//host/...`)."""
ASSET_REFERENCE = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


class ExternalRequestError(AssertionError):
    """The page attempted a request to somewhere else than the service."""


def assert_nothing_external(docs: DocsBrowser) -> None:
    """Wait until the page is quiet, then: no request left 127.0.0.1 (all were aborted)."""
    docs.page.wait_for_load_state("networkidle")
    if docs.blocked:
        raise ExternalRequestError(
            "the page attempted requests outside 127.0.0.1 (aborted):\n" + "\n".join(docs.blocked)
        )


def operation(page: Page, method: str, path: str) -> Locator:
    """Swagger UI's block of one operation, e.g. POST /query (not /secure-query)."""
    return page.locator(
        f".opblock.opblock-{method.lower()}"
        f":has(> .opblock-summary .opblock-summary-path[data-path='{path}'])"
    )


def screenshot_operation(block: Locator, name: str) -> None:
    """reports/<name>: the operation from its summary down to the server's response (the
    documented responses below it would make the image five times as tall)."""
    page = block.page
    top = block.evaluate("e => e.getBoundingClientRect().top + window.scrollY")
    left = block.evaluate("e => e.getBoundingClientRect().left + window.scrollX")
    width = block.evaluate("e => e.getBoundingClientRect().width")
    bottom = block.locator(".live-responses-table").evaluate(
        "e => e.getBoundingClientRect().bottom + window.scrollY"
    )
    REPORTS.mkdir(exist_ok=True)
    page.screenshot(
        path=REPORTS / name,
        full_page=True,
        clip={"x": left, "y": top, "width": width, "height": bottom - top + 8},
    )


def open_swagger_ui(docs: DocsBrowser) -> None:
    with docs.step("open /docs and wait for Swagger UI to render"):
        docs.page.goto("/docs")
        expect(docs.page.locator(".swagger-ui .info .title")).to_contain_text(
            "agentserve", timeout=TIMEOUT_MS
        )
        expect(operation(docs.page, "POST", "/query")).to_be_visible(timeout=TIMEOUT_MS)


def execute(docs: DocsBrowser, method: str, path: str, body: str) -> tuple[Locator, Any]:
    """Expand the operation, Try it out, put `body` in the request body, Execute; the block
    and the JSON response body read from the page (after checking the status shows 200)."""
    page = docs.page
    block = operation(page, method, path)
    with docs.step(f"expand {method} {path} and click Try it out"):
        block.locator(".opblock-summary-control").click()
        block.get_by_role("button", name="Try it out").click()
    with docs.step(f"put the request body of {method} {path} in the editor"):
        editor = block.locator("textarea.body-param__text")
        editor.fill(body)
        expect(editor).to_have_value(body)
    with docs.step(f"execute {method} {path} and read a 200 from the page"):
        block.get_by_role("button", name="Execute").click()
        live = block.locator(".live-responses-table tr.response")
        expect(live.locator(".response-col_status")).to_have_text("200", timeout=TIMEOUT_MS)
        shown = live.locator(".response-col_description .highlight-code pre")
        expect(shown).to_contain_text('"answer"', timeout=TIMEOUT_MS)
        expect(shown).to_contain_text('"session_id"')
        text = shown.inner_text()
        try:
            answer = json.loads(text)
        except ValueError as exc:
            raise AssertionError(f"the response body shown is not JSON: {text!r}") from exc
    return block, answer


def test_docs_pages_reference_only_the_service(service: Service) -> None:
    """/docs and /redoc name no CDN and no absolute URL; every asset they load is served here."""
    with httpx.Client(base_url=service.url, timeout=10, trust_env=False) as client:
        for path in ("/docs", "/redoc"):
            page = client.get(path)
            assert page.status_code == 200, page.text
            html = page.text
            assert "cdn" not in html.lower(), f"{path} names a CDN:\n{html}"
            assert not ABSOLUTE_URL.findall(html), f"{path} has absolute URLs:\n{html}"
            assets = ASSET_REFERENCE.findall(html)
            assert assets, f"{path} loads no assets?\n{html}"
            for asset in assets:
                assert asset.startswith("/static-offline-docs/"), (path, asset)
                assert client.get(asset).status_code == 200, asset
        spec = client.get("/openapi.json")
        assert spec.status_code == 200
        assert {"/query", "/secure-query"} <= set(spec.json()["paths"])


def test_swagger_ui_runs_a_query(docs_browser: DocsBrowser) -> None:
    open_swagger_ui(docs_browser)
    block, answer = execute(docs_browser, "POST", "/query", '{"message": "Hello from the browser"}')
    assert answer["answer"].startswith("[simulator]"), answer
    assert "Hello from the browser" in answer["answer"], answer
    assert re.fullmatch(r"[0-9a-f-]{36}", answer["session_id"]), answer
    screenshot_operation(block, "swagger-query.png")
    assert_nothing_external(docs_browser)


def test_swagger_ui_authorizes_and_runs_a_secure_query(docs_browser: DocsBrowser) -> None:
    page = docs_browser.page
    token = docs_browser.service.token("browser-user")
    open_swagger_ui(docs_browser)
    with docs_browser.step("authorize with the bearer token in the Authorize dialog"):
        page.locator(".auth-wrapper").get_by_role("button", name="Authorize", exact=True).click()
        dialog = page.locator(".dialog-ux .modal-ux")
        expect(dialog).to_contain_text("Available authorizations", timeout=TIMEOUT_MS)
        dialog.locator("input#auth-bearer-value").fill(token)
        dialog.get_by_role("button", name="Apply credentials").click()
        expect(dialog.get_by_role("heading", name="Authorized")).to_be_visible()
        expect(dialog.get_by_role("button", name="Remove authorization")).to_be_visible()
        dialog.get_by_role("button", name="Close").click()
        expect(dialog).to_have_count(0)
        expect(page.locator(".auth-wrapper button.authorize")).to_have_class(
            re.compile(r"\blocked\b")
        )
    block, answer = execute(
        docs_browser, "POST", "/secure-query", '{"message": "Hello from the browser, signed in"}'
    )
    assert answer["answer"].startswith("[simulator]"), answer
    assert "signed in" in answer["answer"], answer
    with docs_browser.step("the request Swagger UI sent carried the token"):
        expect(block.locator(".curl-command")).to_contain_text(f"Authorization: Bearer {token}")
    screenshot_operation(block, "swagger-secure-query.png")
    assert_nothing_external(docs_browser)


def test_redoc_renders_offline(docs_browser: DocsBrowser) -> None:
    """redoc.standalone.js loads its footer logo from its vendor's CDN; the page's
    Content-Security-Policy keeps the browser from even trying."""
    page = docs_browser.page
    with docs_browser.step("open /redoc and wait for ReDoc to render the API"):
        page.goto("/redoc")
        expect(page.get_by_role("heading", level=1)).to_contain_text(
            "agentserve", timeout=TIMEOUT_MS
        )
        expect(
            page.get_by_role("heading", name="Ask an agent as the token's subject")
        ).to_be_visible()
    page.screenshot(path=REPORTS / "redoc.png")
    assert_nothing_external(docs_browser)
