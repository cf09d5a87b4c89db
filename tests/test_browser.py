"""The chat page in a real browser: Debian's Chromium, driven by Playwright, against the live service.

The server runs as in production (DEBUG off, collected static files served by servestatic) on the test database,
which it shares with this process: PostgreSQL only. Without PostgreSQL or Chromium these tests are skipped,
unless BROWSER_TESTS=required (as in CI), where that is a failure.
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from io import StringIO
from itertools import pairwise
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db import connection

from agents.demo_script import POEM, STORY
from bank.models import DEMO_USER_ID, Card
from tests.conftest import finished_turn
from tests.live import ROOT, LiveServer, poll, server_env
from threads.models import Message, Thread

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # reported by _unavailable
    async_playwright = expect = None

OUTPUT = ROOT / "test-output"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 15_000
BALANCE_FIGURE = "$1,123.45"


def _unavailable() -> str | None:
    if connection.vendor != "postgresql":
        return "needs PostgreSQL, which the live server shares with the tests"
    if not os.access(CHROMIUM, os.X_OK):
        return f"needs Chromium at {CHROMIUM} (Debian package chromium)"
    if async_playwright is None:
        return "needs the playwright package"
    return None


@pytest.fixture(scope="module", autouse=True)
def _browser_available() -> None:
    reason = _unavailable()
    if reason and os.environ.get("BROWSER_TESTS") == "required":
        pytest.fail(f"BROWSER_TESTS=required, but the browser tests {reason}")
    if reason:
        pytest.skip(reason)


pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def served(_browser_available, django_db_setup, tmp_path_factory) -> tuple[dict[str, str], Path]:
    """The environment of the live servers of this module, and their folder, with the static files collected."""
    folder = tmp_path_factory.mktemp("live")
    env = server_env(
        DJANGO_SECRET_KEY="browser-test-secret",
        DJANGO_SECURE_COOKIES="off",  # plain http on 127.0.0.1
        DJANGO_STATIC_ROOT=str(folder / "static"),
        DEMO_MODEL_DELAY_MS="25",
    )
    collect = [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"]
    subprocess.run(collect, cwd=ROOT, env=env, check=True)
    return env, folder


@pytest.fixture
def service(served, transactional_db) -> Iterator[LiveServer]:
    """A server of its own for each test: the database is emptied between tests, and the rows Django re-creates
    then (content types, which audit records refer to) get new ids, which a server's caches would not know."""
    env, folder = served
    server = LiveServer("granian", env, folder / "server.log")
    server.start(healthy=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def demo_password(demo_customer) -> str:
    """The demo login of `make run`, created as it creates it."""
    call_command("create_demo_login", stdout=(out := StringIO()))
    return out.getvalue().rsplit("password ", 1)[1].strip()


@pytest.fixture
async def page(service) -> AsyncIterator:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1200, "height": 820})
        context.set_default_timeout(TIMEOUT_MS)
        yield await new_page(context)
        await browser.close()


async def new_page(context):
    """A tab that records the script errors and console errors it shows."""
    page = await context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    return page


async def sign_in(page, service: LiveServer, password: str) -> None:
    await page.goto(f"{service.url}/chat/")
    assert "/accounts/login/" in page.url
    await page.get_by_label("Username").fill("demo")
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{service.url}/chat/**")


async def new_thread(page, agent_type: str) -> None:
    await page.get_by_label("Assistant").select_option(agent_type)
    await page.get_by_role("button", name="New conversation").click()
    await expect(page.get_by_label("Your message")).to_be_enabled()
    await expect(page.get_by_label("Your message")).to_be_focused()


async def ask(page, text: str) -> None:
    await page.get_by_label("Your message").fill(text)
    await page.get_by_label("Your message").press("Enter")


# Records, in the page, when Enter is pressed in the input and every distinct text the newest answer shows (with
# when, since that Enter).
WATCH_ANSWER = """() => {
  const seen = (window.answerWatch = {enter: null, question: null, texts: []});
  document.getElementById("query").addEventListener("keydown", (event) => {
    if (event.key === "Enter") seen.enter = performance.now();
  }, {capture: true});
  new MutationObserver(() => {
    if (seen.enter !== null && seen.question === null && document.querySelector(".message.user")) {
      seen.question = performance.now() - seen.enter;
    }
    const answers = document.querySelectorAll(".message.assistant .text");
    const text = answers.length ? answers[answers.length - 1].textContent : "";
    if (text && text !== seen.texts.at(-1)?.text) {
      seen.texts.push({text, at: seen.enter === null ? null : performance.now() - seen.enter});
    }
  }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
}"""


# The page's scripts and stylesheets, as the browser fetched them: body sizes on the wire and decoded.
STATIC_ASSETS = r"""() => performance.getEntriesByType("resource")
  .map((entry) => ({path: new URL(entry.name).pathname, encoded: entry.encodedBodySize,
                    decoded: entry.decodedBodySize}))
  .filter((asset) => /^\/static\/.+\.[0-9a-f]{12}\.(js|css)$/.test(asset.path))
  .map((asset) => ({...asset, kind: asset.path.split(".").pop()}))"""


def last_answer(page):
    return page.locator(".message.assistant").last


def approval_card(within, action: str = "Block your card"):
    return within.get_by_role("group", name=f"Approval needed: {action}")


async def texts_seen(page) -> list[str]:
    return [seen["text"] for seen in (await page.evaluate("window.answerWatch"))["texts"]]


def grew_in_place(texts: list[str]) -> bool:
    """Each text the answer showed began with the one before: nothing was shown twice, nothing went away."""
    return all(later.startswith(earlier) for earlier, later in pairwise(texts))


async def demo_card() -> Card:
    return await Card.objects.aget(customer__user_id=DEMO_USER_ID)


class Sockets:
    """The page's thread websockets, routed through Playwright to the live server: each one's URL and the events
    it received. Like a network that fails, it can drop a socket, hold the next ones open without reaching the
    server, and hold back the approval frames the page sends."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.events: list[list[dict]] = []
        self.routes: list = []
        self.holding_sockets = False
        self.held_sockets: list = []
        self.holding_decisions = False
        self.held_decisions: list[tuple] = []

    async def route(self, page) -> None:
        await page.route_web_socket(re.compile(r"/ws/v1/threads/"), self._opened)

    def _opened(self, ws) -> None:
        if self.holding_sockets:
            self.held_sockets.append(ws)  # open, as far as the page can tell, and silent
            return
        server = ws.connect_to_server()
        events: list[dict] = []
        self.urls.append(ws.url)
        self.events.append(events)
        self.routes.append(ws)

        def from_server(message: str | bytes) -> None:
            events.append(json.loads(message))
            ws.send(message)

        def from_page(message: str | bytes) -> None:
            if self.holding_decisions and json.loads(message)["type"] == "approval":
                self.held_decisions.append((server, message))
            else:
                server.send(message)

        server.on_message(from_server)
        ws.on_message(from_page)

    async def drop(self) -> None:
        """Close the latest socket, as a lost connection would."""
        await self.routes[-1].close(code=4000, reason="dropped")

    async def let_through(self) -> None:
        """Let sockets reach the server again: the held ones close, and the page opens new ones."""
        self.holding_sockets = False
        for ws in self.held_sockets:
            await ws.close(code=4000, reason="dropped")
        self.held_sockets.clear()

    def pass_decisions(self) -> None:
        self.holding_decisions = False
        for server, message in self.held_decisions:
            server.send(message)
        self.held_decisions.clear()

    def resumed_from(self, index: int) -> tuple[str, int]:
        """The answer and seq the socket `index` resumed from, at its handshake."""
        query = parse_qs(urlsplit(self.urls[index]).query)
        return query["resume"][0], int(query["after"][0])


async def test_bank_support_answer_streams_in_place_and_the_thread_keeps_it(page, service, demo_password):
    await sign_in(page, service, demo_password)
    await new_thread(page, "bank_support")
    await page.evaluate(WATCH_ANSWER)

    await ask(page, "What is my balance?")
    answer = last_answer(page)
    await expect(answer).to_have_attribute("data-status", "complete")
    await expect(answer.locator(".text")).to_contain_text(f"your current balance is {BALANCE_FIGURE}")
    await expect(answer.locator(".tools")).to_have_text("Looked up your balance")
    await expect(answer.locator(".risk")).to_have_text("Risk: low (0/10)")
    await expect(answer.locator(".banner")).to_be_hidden()
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    watch = await page.evaluate("window.answerWatch")
    texts = [seen["text"] for seen in watch["texts"]]
    # Deltas arrived one by one, each growing the same paragraph; the figure came later than the first of them.
    assert len(texts) >= 5, texts
    assert grew_in_place(texts), texts
    assert BALANCE_FIGURE not in texts[0]
    first_delta_ms = watch["texts"][0]["at"]
    assets = await page.evaluate(STATIC_ASSETS)
    # One stylesheet and one module, under content-hashed names (cached for ever), sent compressed.
    assert sorted(asset["kind"] for asset in assets) == ["css", "js"], assets
    assert all(0 < asset["encoded"] < asset["decoded"] for asset in assets), assets

    await ask(page, "I lost my card")
    answer = last_answer(page)
    # The answer stops to ask before the card is blocked, and goes on, in the same bubble, once approved.
    await expect(answer).to_have_attribute("data-status", "awaiting_approval")
    await expect(answer.locator(".tools")).to_have_text("Asked to block your card")
    assert (await demo_card()).blocked_at is None
    await approval_card(answer).get_by_role("button", name="Approve").click()
    await expect(approval_card(answer).locator(".approval-outcome")).to_have_text("Approved")
    await expect(answer).to_have_attribute("data-status", "complete")
    await expect(answer.locator(".banner")).to_be_visible()
    await expect(answer.locator(".banner")).to_have_text("Your card has been blocked.")
    await expect(answer.locator(".text")).to_contain_text("your card ending in 4242 is now blocked")
    await expect(answer.locator(".tools")).to_have_text("Blocked your card")
    await expect(answer.locator(".risk")).to_have_attribute("data-level", "high")
    await expect(answer.locator(".actions li")).to_have_text(["Order a replacement card", "Review recent transactions"])
    await expect(approval_card(answer).get_by_role("button")).to_have_count(0)
    card = await demo_card()
    assert (card.status, card.blocked_at is not None) == (Card.Status.BLOCKED, True)

    thread = await sync_to_async(Thread.objects.get)()
    first_answer = await Message.objects.filter(role=Message.Role.ASSISTANT).order_by("seq").afirst()
    assert thread.title == "What is my balance?"
    await expect(page.locator("#thread-list [aria-current=true]")).to_contain_text("What is my balance?")

    await page.reload()
    await expect(page.locator("#thread-title")).to_have_text("What is my balance?")
    await expect(page.locator(".message.user")).to_have_text(["What is my balance?", "I lost my card"])
    await expect(page.locator(".message.assistant").first).to_contain_text(BALANCE_FIGURE)
    # The saved answers name the tools they used, as the stream did.
    await expect(page.locator(".message.assistant .tools")).to_have_text(
        ["Looked up your balance", "Blocked your card"]
    )
    await expect(last_answer(page).locator(".banner")).to_be_visible()
    await expect(page.get_by_label("Your message")).to_be_focused()
    assert page.errors == []

    OUTPUT.mkdir(exist_ok=True)
    await page.screenshot(path=OUTPUT / "chat-final.png")
    (OUTPUT / "browser-timings.json").write_text(
        json.dumps(
            {
                "enter_to_question_shown_ms": round(watch["question"], 1),
                "enter_to_first_visible_delta_ms": round(first_delta_ms, 1),
                "server_time_to_first_token_ms": first_answer.metadata["time_to_first_token_ms"],
                "deltas_seen": len(texts),
                "static_bytes_served": sum(asset["encoded"] for asset in assets),
                "static_bytes_uncompressed": sum(asset["decoded"] for asset in assets),
                "assets": assets,
            },
            indent=2,
        )
    )


async def test_stop_marks_a_long_answer_incomplete_at_phone_width(page, service, demo_password):
    await page.set_viewport_size({"width": 390, "height": 780})
    await sign_in(page, service, demo_password)
    await new_thread(page, "general_chat")

    await ask(page, "Write me a poem")
    answer = last_answer(page)
    await expect(answer.locator(".text")).not_to_be_empty()
    await expect(answer).to_have_attribute("data-status", "streaming")

    await page.get_by_role("button", name="Stop").click()
    await expect(answer).to_have_attribute("data-status", "incomplete")
    await expect(answer.locator(".state")).to_have_text("Stopped: this answer is incomplete.")
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    partial = await answer.locator(".text").text_content()
    assert partial and POEM.startswith(partial) and len(partial) < len(POEM)

    saved = await sync_to_async(Message.objects.get)(role=Message.Role.ASSISTANT)
    assert (saved.status, saved.content) == (Message.Status.INCOMPLETE, partial)

    await page.reload()
    await expect(last_answer(page).locator(".state")).to_have_text("Stopped: this answer is incomplete.")
    # Nothing is wider than a phone.
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await expect(page.get_by_role("button", name="Send")).to_be_in_viewport()
    assert page.errors == []


async def test_send_becomes_stop_while_an_answer_is_written_and_the_next_question_waits(page, service, demo_password):
    sent: list[dict] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda frame: sent.append(json.loads(frame))))
    await sign_in(page, service, demo_password)
    await new_thread(page, "general_chat")
    send, stop = page.get_by_role("button", name="Send"), page.get_by_role("button", name="Stop")
    box = page.get_by_label("Your message")
    await expect(stop).to_be_hidden()

    await ask(page, "Write me a poem")
    answer = last_answer(page)
    await expect(stop).to_be_visible()
    await expect(send).to_be_hidden()
    await expect(answer.locator(".text")).not_to_be_empty()
    await box.fill("And another one")
    await box.press("Enter")
    await expect(box).to_have_value("And another one")
    await expect(box).to_be_focused()

    await expect(answer).to_have_attribute("data-status", "complete")
    await expect(send).to_be_visible()
    await expect(stop).to_be_hidden()
    # Enter while the answer was written sent nothing; now it sends the question waiting in the box.
    assert [frame["query"] for frame in sent if frame["type"] == "query"] == ["Write me a poem"]
    await box.press("Enter")
    await expect(page.locator(".message.user")).to_have_text(["Write me a poem", "And another one"])
    await expect(box).to_have_value("")
    await expect(last_answer(page)).to_have_attribute("data-status", "complete")
    assert page.errors == []


async def test_a_dropped_socket_resumes_the_answer_in_place(page, service, demo_password):
    sockets = Sockets()
    await sockets.route(page)
    await sign_in(page, service, demo_password)
    await new_thread(page, "general_chat")
    await page.evaluate(WATCH_ANSWER)
    await page.evaluate("window.sameDocument = true")

    await ask(page, "Write me a poem")
    answer = last_answer(page)
    await expect(answer.locator(".text")).not_to_be_empty()
    await sockets.drop()

    await expect(answer).to_have_attribute("data-status", "complete")
    saved = await Message.objects.aget(role=Message.Role.ASSISTANT)
    assert saved.content == POEM
    assert await answer.locator(".text").text_content() == POEM
    await expect(page.locator(".message")).to_have_count(2)
    await expect(page.get_by_role("status")).to_have_text("")
    # The new socket asked for the answer's events after the last one shown, and got them, each once.
    assert len(sockets.urls) == 2
    message_id, after = sockets.resumed_from(1)
    assert message_id == str(saved.pk) and after > 0
    seqs = [event["seq"] for event in sockets.events[1] if event.get("message_id") == message_id]
    assert seqs == sorted(set(seqs)) and seqs[0] > after, seqs
    # Neither the page nor the thread was loaded again: the text only ever grew.
    texts = await texts_seen(page)
    assert grew_in_place(texts) and texts[-1] == POEM, texts
    assert await page.evaluate("window.sameDocument") is True
    assert page.errors == []


async def test_an_answer_whose_events_are_gone_is_read_from_the_thread_after_a_reconnect(page, service, demo_password):
    sockets = Sockets()
    await sockets.route(page)
    await sign_in(page, service, demo_password)
    await new_thread(page, "general_chat")

    await ask(page, "Write me a poem")
    answer = last_answer(page)
    await expect(answer.locator(".text")).not_to_be_empty()
    sockets.holding_sockets = True
    await sockets.drop()
    # While the page is away the answer ends, and the server restarts: the events it kept (in its process) are gone.
    await sync_to_async(poll)(
        lambda: Message.objects.filter(role=Message.Role.ASSISTANT, status=Message.Status.COMPLETE).exists()
    )
    await sync_to_async(service.stop)()
    await sync_to_async(service.start)(healthy=True)
    await sockets.let_through()

    await expect(answer).to_have_attribute("data-status", "complete")
    await expect(page.get_by_role("status")).to_have_text("")
    assert await answer.locator(".text").text_content() == POEM
    saved = await Message.objects.aget(role=Message.Role.ASSISTANT)
    # The page asked for the rest of the answer; told its events are gone, it read the saved thread instead.
    assert sockets.resumed_from(-1)[0] == str(saved.pk)
    assert [event.get("error_type") for event in sockets.events[-1] if event["event"] == "error"] == ["resume_expired"]
    await expect(page.get_by_role("alert")).to_be_hidden()
    await expect(page.locator(".message")).to_have_count(2)


async def test_a_socket_dropped_between_answers_reconnects_and_reloads_the_thread(page, service, demo_password):
    await sign_in(page, service, demo_password)
    await new_thread(page, "bank_support")
    thread = await sync_to_async(Thread.objects.get)()

    await sync_to_async(service.stop)()
    await expect(page.get_by_role("status")).to_contain_text("Connection lost")
    # While this page is away, an answer lands on the thread from elsewhere.
    await sync_to_async(_finished_turn)(thread, "Sent from my phone", "Answered while you were away.")
    await sync_to_async(service.start)(healthy=True)

    await expect(page.get_by_role("status")).to_have_text("", timeout=20_000)
    await expect(page.locator(".message.user")).to_have_text(["Sent from my phone"])
    await expect(last_answer(page)).to_contain_text("Answered while you were away.")
    await ask(page, "What is my balance?")
    await expect(last_answer(page).locator(".text")).to_contain_text(BALANCE_FIGURE)
    await expect(last_answer(page)).to_have_attribute("data-status", "complete")


async def test_a_second_tab_joins_the_answer_being_written(page, service, demo_password):
    await sign_in(page, service, demo_password)
    await new_thread(page, "general_chat")
    await ask(page, "Tell me a story")
    await expect(last_answer(page).locator(".text")).not_to_be_empty()
    thread = await Thread.objects.aget()

    second = await new_page(page.context)
    joined: list[str] = []
    second.on("websocket", lambda ws: joined.append(ws.url))
    await second.add_init_script(f"document.addEventListener('DOMContentLoaded', {WATCH_ANSWER})")
    await second.goto(f"{service.url}/chat/#{thread.pk}")

    answer = last_answer(second)
    await expect(answer).to_have_attribute("data-status", "complete", timeout=TIMEOUT_MS)
    await expect(last_answer(page)).to_have_attribute("data-status", "complete")
    saved = await Message.objects.aget(role=Message.Role.ASSISTANT)
    assert saved.content == STORY
    assert await answer.locator(".text").text_content() == STORY
    await expect(second.locator(".message")).to_have_count(2)
    # It joined the answer from its first event (the thread said it was being written), and showed it grow.
    assert parse_qs(urlsplit(joined[0]).query) == {"resume": [str(saved.pk)], "after": ["0"]}
    texts = await texts_seen(second)
    assert len(texts) > 1 and grew_in_place(texts) and texts[-1] == STORY, texts
    assert second.errors == page.errors == []


async def test_a_pending_approval_outlives_a_reload_and_denying_it_leaves_the_card_active(page, service, demo_password):
    sockets = Sockets()
    await sockets.route(page)
    await sign_in(page, service, demo_password)
    await new_thread(page, "bank_support")
    await ask(page, "I lost my card")
    answer = last_answer(page)
    await expect(approval_card(answer)).to_be_visible()
    await expect(answer.locator(".state")).to_have_text("Waiting for your approval.")
    OUTPUT.mkdir(exist_ok=True)
    await page.screenshot(path=OUTPUT / "chat-approval.png")

    await page.reload()
    answer = last_answer(page)
    card = approval_card(answer)
    await expect(answer.locator(".tools")).to_have_text("Asked to block your card")
    await expect(card).to_contain_text("Decide by")
    sockets.holding_decisions = True
    await card.get_by_role("button", name="Deny").click()
    # Until the server hears the decision, neither can be sent again.
    await expect(card.get_by_role("button", name="Deny")).to_be_disabled()
    await expect(card.get_by_role("button", name="Approve")).to_be_disabled()
    sockets.pass_decisions()

    await expect(card.locator(".approval-outcome")).to_have_text("Denied")
    await expect(answer).to_have_attribute("data-status", "complete")
    await expect(answer.locator(".text")).to_contain_text("I have not blocked your card: it is still active")
    await expect(answer.locator(".tools")).to_have_text("Did not block your card: not approved")
    await expect(answer.locator(".risk")).to_have_attribute("data-level", "medium")
    await expect(answer.locator(".banner")).to_be_hidden()
    card_row = await demo_card()
    assert (card_row.status, card_row.blocked_at) == (Card.Status.ACTIVE, None)

    await page.reload()
    await expect(last_answer(page).locator(".tools")).to_have_text("Did not block your card: not approved")
    await expect(last_answer(page).locator(".text")).to_contain_text("I have not blocked your card")
    await expect(page.get_by_role("button", name="Approve")).to_have_count(0)
    assert page.errors == []


async def test_earlier_messages_load_on_demand(page, service, demo_password, demo_customer):
    thread = await Thread.objects.acreate(user_id=demo_customer.user_id, agent_type="bank_support", title="Long")
    for index in range(30):
        await sync_to_async(_finished_turn)(thread, f"Question {index}", f"Answer {index}.")

    await sign_in(page, service, demo_password)
    await expect(page.locator("#thread-title")).to_have_text("Long")
    # The latest 50 of the 60 messages, then the 10 before them, in order.
    await expect(page.locator(".message")).to_have_count(50)
    await expect(page.locator(".message").first).to_have_text("Question 5")
    await page.get_by_role("button", name="Show earlier messages").click()
    await expect(page.locator(".message")).to_have_count(60)
    await expect(page.locator(".message.user").first).to_have_text("Question 0")
    await expect(page.get_by_role("button", name="Show earlier messages")).to_be_hidden()
    assert page.errors == []


def _finished_turn(thread: Thread, query: str, advice: str) -> None:
    output = {"support_advice": advice, "block_card": False, "risk_level": 1, "follow_up_actions": []}
    finished_turn(thread, query=query, answer=json.dumps(output), output=output)
