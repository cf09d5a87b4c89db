"""The admin's transcript of a conversation in a real browser, against the live service (see tests/test_browser.py
for how it runs, and when these tests are skipped)."""

import pytest
from django.contrib.auth.models import User

from bank.models import DEMO_USER_ID
from tests.test_browser import OUTPUT, _browser_available, page, served, service  # noqa: F401
from threads.models import Thread

try:
    from playwright.async_api import expect
except ImportError:  # reported by _browser_available
    expect = None

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "review-desk-password"


@pytest.fixture
def staff(demo_customer) -> User:
    return User.objects.create_superuser("reviewer", "", PASSWORD)


async def api(page, service, method: str, path: str, key: str, body: dict) -> dict:  # noqa: F811
    headers = {"X-API-Key": key, "X-User-ID": str(DEMO_USER_ID)}
    response = await page.request.fetch(f"{service.url}{path}", method=method, headers=headers, data=body)
    assert response.ok, (response.status, await response.text())
    return await response.json()


async def bank_exchange(page, service, key: str) -> Thread:  # noqa: F811
    """A conversation through the service: a balance question (a tool call), a lost card (approved, blocked)."""
    thread = await api(page, service, "POST", "/api/v1/threads", key, {"agent_type": "bank_support"})
    asked = {"thread_id": thread["id"]}
    await api(page, service, "POST", "/api/v1/agent/query", key, {**asked, "query": "What is my balance?"})
    waiting = await api(page, service, "POST", "/api/v1/agent/query", key, {**asked, "query": "I lost my card"})
    assert waiting["status"] == "awaiting_approval", waiting
    decision = {"approved": True, "note": "Yes, block it"}
    decided = f"/api/v1/threads/{thread['id']}/approvals/{waiting['approval']['id']}"
    await api(page, service, "POST", decided, key, decision)
    return await Thread.objects.aget(pk=thread["id"])


async def test_a_reviewer_reads_a_bank_support_conversation_as_a_transcript(page, service, staff, api_key):  # noqa: F811
    thread = await bank_exchange(page, service, api_key)
    # Django's admin names no icon, so the browser asks for /favicon.ico, which the service does not serve.
    await page.route("**/favicon.ico", lambda route: route.fulfill(status=204))

    await page.goto(f"{service.url}/admin/login/?next=/admin/threads/thread/")
    await page.locator("#id_username").fill("reviewer")
    await page.locator("#id_password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{service.url}/admin/threads/thread/")
    row = page.locator("#result_list tbody tr").first
    await expect(row.locator(".field-risk")).to_have_text("8")
    await expect(row.locator(".field-card_blocked img")).to_have_attribute("alt", "True")

    await page.goto(f"{service.url}/admin/threads/thread/{thread.pk}/change/")
    transcript = page.locator(".transcript")
    answers = transcript.locator(".turn.assistant")
    await expect(transcript.locator(".turn.user .text")).to_have_text(["What is my balance?", "I lost my card"])
    await expect(answers.first.locator(".advice")).to_contain_text("$1,123.45")
    await expect(answers.first.locator(".risk-pill.low")).to_be_visible()
    await expect(answers.first.locator("table.calls")).to_contain_text("customer_balance")
    high = answers.last.locator(".risk-pill.high")
    await expect(high).to_be_visible()
    await expect(high).to_have_text("risk 8")
    assert await high.evaluate("pill => getComputedStyle(pill).backgroundColor") == "rgb(198, 40, 40)"
    await expect(answers.last.locator("table.calls")).to_contain_text("block_card")
    await expect(answers.last.locator(".approval")).to_contain_text("block_card: approved")
    await expect(answers.last.locator(".actions li").first).to_be_visible()
    await expect(answers.last).to_contain_text("cost unknown")
    await expect(page.get_by_role("link", name="Export JSON")).to_be_visible()
    assert page.errors == []

    OUTPUT.mkdir(exist_ok=True)
    await page.screenshot(path=OUTPUT / "admin-transcript.png", full_page=True)
