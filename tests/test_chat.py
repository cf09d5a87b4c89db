"""The chat page: Django login, the page itself, session-authenticated REST with CSRF, and the demo login."""

import re
import uuid
from io import StringIO

import pytest
from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client

from bank.models import DEMO_USER_ID
from identity.models import Profile
from identity.services import login_ensure, profile_user_id
from threads.models import Thread

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture
def member() -> User:
    user, _ = login_ensure(username="alice", password=PASSWORD, user_id=uuid.UUID(int=7))
    return user


@pytest.fixture
def browser(member) -> Client:
    """A signed-in browser: CSRF is checked as in a real one."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(member)
    return client


def csrf_token(client: Client) -> str:
    page = client.get("/chat/")
    return re.search(r'name="csrf-token" content="([^"]+)"', page.content.decode()).group(1)


def demo_login_output() -> str:
    out = StringIO()
    call_command("create_demo_login", stdout=out)
    return out.getvalue()


# The page


def test_chat_page_sends_anonymous_visitors_to_the_login_page():
    response = Client().get("/chat/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/chat/"


def test_site_root_leads_to_the_chat_page():
    response = Client().get("/")
    assert (response.status_code, response["Location"]) == (302, "/chat/")


def test_login_page_renders_with_a_content_security_policy():
    response = Client().get("/accounts/login/")
    assert response.status_code == 200
    assert "default-src 'self'" in response["Content-Security-Policy"]
    assert b'name="password"' in response.content


def test_signing_in_leads_to_the_chat_page(member):
    response = Client().post("/accounts/login/", {"username": "alice", "password": PASSWORD, "next": "/chat/"})
    assert (response.status_code, response["Location"]) == (302, "/chat/")


def test_wrong_password_stays_on_the_login_page_with_a_message(member):
    response = Client().post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert response.status_code == 200
    assert b'role="alert"' in response.content


def test_chat_page_renders_for_a_signed_in_user(browser):
    response = browser.get("/chat/")
    assert response.status_code == 200
    assert response["Content-Security-Policy"].startswith("default-src 'self'")
    html = response.content.decode()
    assert '<script type="module" src="/static/chat/chat.js">' in html
    assert 'id="chat-config"' in html
    assert '<option value="bank_support"' in html
    assert '<option value="general_chat"' in html
    for control in ("agent-type", "query"):
        assert f'<label for="{control}">' in html


def test_signing_out_ends_the_session(browser):
    response = browser.post("/accounts/logout/", {"csrfmiddlewaretoken": csrf_token(browser)})
    assert (response.status_code, response["Location"]) == (302, "/accounts/login/")
    assert browser.get("/api/v1/threads").status_code == 401


# Session-authenticated API


def test_session_post_without_csrf_token_is_refused_and_writes_nothing(browser):
    response = browser.post("/api/v1/threads", {"agent_type": "bank_support"}, content_type="application/json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"
    assert not Thread.objects.exists()


def test_session_post_with_csrf_token_acts_for_the_profiles_user_id(browser, member):
    response = browser.post(
        "/api/v1/threads",
        {"agent_type": "general_chat"},
        content_type="application/json",
        headers={"X-CSRFToken": csrf_token(browser)},
    )
    assert response.status_code == 201, response.content
    assert response.json()["user_id"] == str(uuid.UUID(int=7))
    assert Thread.objects.get().user_id == member.profile.user_id


def test_session_reads_need_no_csrf_token_and_see_only_their_own_threads(browser, make_thread):
    own = make_thread(user=uuid.UUID(int=7))
    foreign = make_thread(user=DEMO_USER_ID)
    assert [thread["id"] for thread in browser.get("/api/v1/threads").json()] == [str(own.pk)]
    assert browser.get(f"/api/v1/threads/{foreign.pk}").status_code == 404


def test_session_patch_needs_the_csrf_token_too(browser, make_thread):
    thread = make_thread(user=uuid.UUID(int=7))
    url = f"/api/v1/threads/{thread.pk}"
    refused = browser.patch(url, {"title": "Renamed"}, content_type="application/json")
    assert refused.status_code == 403
    accepted = browser.patch(
        url, {"title": "Renamed"}, content_type="application/json", headers={"X-CSRFToken": csrf_token(browser)}
    )
    assert accepted.status_code == 200
    thread.refresh_from_db()
    assert thread.title == "Renamed"


def test_session_cannot_issue_websocket_tickets(browser, make_thread):
    thread = make_thread(user=uuid.UUID(int=7))
    response = browser.post(
        "/api/v1/ws-tickets",
        {"thread_id": str(thread.pk)},
        content_type="application/json",
        headers={"X-CSRFToken": csrf_token(browser)},
    )
    assert response.status_code == 401


def test_inactive_user_is_not_authenticated(browser, member):
    member.is_active = False
    member.save()
    assert browser.get("/api/v1/threads").status_code == 401


def test_a_login_without_a_profile_gets_one_stable_user_id():
    user = User.objects.create_user("bob", password=PASSWORD)
    first = profile_user_id(user=user)
    assert profile_user_id(user=user) == first
    assert Profile.objects.get(login=user).user_id == first
    assert first != DEMO_USER_ID


# The demo login


def test_demo_login_acts_for_the_demo_customer_and_signs_in():
    output = demo_login_output()
    password = re.search(r"username demo, password (\S+)", output).group(1)
    assert output.startswith("Created the demo login")
    user = authenticate(username="demo", password=password)
    assert user is not None
    assert user.profile.user_id == DEMO_USER_ID


def test_demo_login_is_created_once_and_its_credentials_printed_every_time():
    first = demo_login_output()
    again = demo_login_output()
    assert again.startswith("The demo login")
    assert first.split("password ")[1] == again.split("password ")[1]
    assert User.objects.filter(username="demo").count() == 1


def test_demo_login_keeps_a_changed_password_and_says_so():
    demo_login_output()
    user = User.objects.get(username="demo")
    user.set_password(PASSWORD)
    user.save()
    assert "exists with another password" in demo_login_output()
    assert authenticate(username="demo", password=PASSWORD) is not None


def test_demo_login_refuses_when_the_demo_customer_belongs_to_another_login():
    login_ensure(username="john", password=PASSWORD, user_id=DEMO_USER_ID)
    with pytest.raises(CommandError, match="already belongs to the login 'john'"):
        demo_login_output()
    assert not User.objects.filter(username="demo").exists()


# Admin


def test_admin_user_page_shows_the_logins_user_id(admin_client, member):
    url = f"/admin/auth/user/{member.pk}/change/"
    page = admin_client.get(url)
    assert page.status_code == 200
    assert str(uuid.UUID(int=7)) in page.content.decode()


def test_admin_user_page_changes_the_logins_user_id(admin_client, member):
    profile = member.profile
    form = {
        "username": "alice",
        "is_active": "on",
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
        "profile-TOTAL_FORMS": "1",
        "profile-INITIAL_FORMS": "1",
        "profile-MIN_NUM_FORMS": "0",
        "profile-MAX_NUM_FORMS": "1",
        "profile-0-id": str(profile.pk),
        "profile-0-login": str(member.pk),
        "profile-0-user_id": str(DEMO_USER_ID),
    }
    response = admin_client.post(f"/admin/auth/user/{member.pk}/change/", form)
    assert response.status_code == 302, response.content
    profile.refresh_from_db()
    assert profile.user_id == DEMO_USER_ID
