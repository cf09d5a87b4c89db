"""Rate limits: runs per key and per end user on the run endpoints, every request per key, and THROTTLE_RATES."""

import uuid
from dataclasses import dataclass

import pytest
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from rest_framework.test import APIClient

from bankagent.settings import _throttle_rates
from bankagent.throttling import PROCESS_COUNTS, SHARED_COUNTS_RETRY_SECONDS, PrincipalRateThrottle
from identity.models import APIKey, Profile
from identity.services import login_ensure
from threads.models import Message, Thread

pytestmark = pytest.mark.django_db

THREADS = "/api/v1/threads"
RUN_ENDPOINTS = ["/api/v1/agent/query", "/api/v1/agent/stream"]
OTHER_USER = uuid.UUID("00000000-0000-4000-8000-0000000000b0")


@dataclass
class Clock:
    now: float


@pytest.fixture(autouse=True)
def _counts_start_at_zero():
    cache.clear()
    PROCESS_COUNTS.clear()
    yield
    cache.clear()
    PROCESS_COUNTS.clear()
    PrincipalRateThrottle.shared_counts_down_until = 0.0


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> Clock:
    """The throttles' time, frozen: a test moves it on by hand."""
    frozen = Clock(now=1_800_000_000.0)
    monkeypatch.setattr(PrincipalRateThrottle, "timer", staticmethod(lambda: frozen.now))
    return frozen


def keyed(user_id: uuid.UUID, key: str | None = None) -> APIClient:
    if key is None:
        _, key = APIKey.objects.create_key(name="throttled")
    api = APIClient()
    api.credentials(HTTP_X_API_KEY=key, HTTP_X_USER_ID=str(user_id))
    return api


def run(api: APIClient, path: str, thread: Thread):
    return api.post(path, {"thread_id": str(thread.pk), "query": "Hello"}, format="json")


def assert_throttled(response) -> int:
    """The contract's 429, and the seconds it says to wait."""
    assert response.status_code == 429, response.content
    assert response.json()["error"]["code"] == "throttled"
    retry_after = response["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
    return int(retry_after)


def written(thread: Thread) -> tuple:
    thread.refresh_from_db()
    return thread.last_seq, thread.updated_at, Message.objects.filter(thread=thread).count()


# runs_key


@pytest.mark.parametrize("path", RUN_ENDPOINTS)
def test_key_past_runs_key_is_429_throttled_with_retry_after_and_writes_nothing(settings, client, make_thread, path):
    settings.THROTTLE_RATES = {"runs_key": "1/min"}
    thread = make_thread(agent_type="general_chat")
    assert run(client, RUN_ENDPOINTS[0], thread).status_code == 200  # the key's one run this minute
    before = written(thread)

    response = run(client, path, thread)

    assert 1 <= assert_throttled(response) <= 61  # the whole minute is still to wait
    assert written(thread) == before


def test_retry_after_is_the_wait_rounded_up_to_a_whole_second(settings, client, make_thread, clock):
    settings.THROTTLE_RATES = {"runs_key": "1/min"}
    thread = make_thread(agent_type="general_chat")
    assert run(client, RUN_ENDPOINTS[0], thread).status_code == 200

    full_minute = run(client, RUN_ENDPOINTS[0], thread)
    clock.now += 59.5
    half_a_second = run(client, RUN_ENDPOINTS[0], thread)

    assert (assert_throttled(full_minute), assert_throttled(half_a_second)) == (60, 1)


def test_key_runs_again_once_its_minute_has_passed(settings, client, make_thread, clock):
    settings.THROTTLE_RATES = {"runs_key": "1/min"}
    thread = make_thread(agent_type="general_chat")
    assert run(client, RUN_ENDPOINTS[0], thread).status_code == 200

    clock.now += 59.5
    almost = run(client, RUN_ENDPOINTS[0], thread)
    clock.now += 0.5
    again = run(client, RUN_ENDPOINTS[0], thread)

    assert_throttled(almost)
    assert again.status_code == 200, again.content


def test_runs_key_does_not_count_reads(settings, client, make_thread):
    settings.THROTTLE_RATES = {"runs_key": "1/min"}
    thread = make_thread(agent_type="general_chat")
    for _ in range(3):
        assert client.get(THREADS).status_code == 200

    assert run(client, RUN_ENDPOINTS[0], thread).status_code == 200


# runs_user


def test_runs_user_counts_the_runs_of_an_end_user_across_keys(settings, user_id, make_thread):
    settings.THROTTLE_RATES = {"runs_user": "1/min"}
    thread = make_thread(agent_type="general_chat")
    others = make_thread(user=OTHER_USER, agent_type="general_chat")
    _, second_key = APIKey.objects.create_key(name="second")
    assert run(keyed(user_id), RUN_ENDPOINTS[0], thread).status_code == 200
    before = written(thread)

    same_user = [run(keyed(user_id, second_key), path, thread) for path in RUN_ENDPOINTS]
    other_user = run(keyed(OTHER_USER, second_key), RUN_ENDPOINTS[0], others)

    for response in same_user:
        assert_throttled(response)
    assert written(thread) == before
    assert other_user.status_code == 200, other_user.content


# key


def test_key_counts_every_request_of_the_key_and_leaves_other_keys_alone(settings, user_id, make_thread):
    settings.THROTTLE_RATES = {"key": "2/min"}
    _, key = APIKey.objects.create_key(name="busy")
    make_thread(agent_type="general_chat")
    busy, other = keyed(user_id, key), keyed(user_id)

    allowed = [busy.get(THREADS), keyed(OTHER_USER, key).get(THREADS)]  # one key, whichever end user it names
    refused = [busy.get(THREADS), busy.post(THREADS, {"agent_type": "general_chat"}, format="json")]

    assert [response.status_code for response in allowed] == [200, 200]
    for response in refused:
        assert_throttled(response)
    assert Thread.objects.count() == 1
    assert other.get(THREADS).status_code == 200


def test_key_counts_a_signed_in_user_by_its_user_id(settings, user_id):
    settings.THROTTLE_RATES = {"key": "1/min"}
    alice, _ = login_ensure(username="alice", password="pw-alice-1", user_id=uuid.UUID(int=0xA))
    bob, _ = login_ensure(username="bob", password="pw-bob-1", user_id=uuid.UUID(int=0xB))
    sessions = {name: Client() for name in ("alice", "alice again", "bob")}
    sessions["alice"].force_login(alice)
    sessions["alice again"].force_login(alice)
    sessions["bob"].force_login(bob)

    first = sessions["alice"].get(THREADS)
    second_session = sessions["alice again"].get(THREADS)
    others = [sessions["bob"].get(THREADS), keyed(uuid.UUID(int=0xA)).get(THREADS)]
    Profile.objects.filter(login=alice).update(user_id=uuid.UUID(int=0xC))
    as_another_user = sessions["alice"].get(THREADS)

    assert first.status_code == 200
    assert_throttled(second_session)  # her sessions share one count: it is her user id's
    assert [response.status_code for response in others] == [200, 200]
    assert as_another_user.status_code == 200


def test_no_rates_means_no_throttling(settings, client, make_thread):
    settings.THROTTLE_RATES = {}
    thread = make_thread(agent_type="general_chat")

    responses = [client.get(THREADS) for _ in range(5)] + [run(client, RUN_ENDPOINTS[0], thread) for _ in range(3)]

    assert {response.status_code for response in responses} == {200}


# THROTTLE_RATES


@pytest.mark.parametrize("spec", ["off", "OFF", " Off "])
def test_throttle_rates_off_is_no_rates(spec):
    assert _throttle_rates(spec) == {}


def test_throttle_rates_parses_the_documented_example():
    rates = _throttle_rates("runs_user=30/min,runs_key=1200/min,key=6000/min")

    assert rates == {"runs_user": "30/min", "runs_key": "1200/min", "key": "6000/min"}


@pytest.mark.parametrize("spec", ["runs_user", "runs_user=30/min,key", "runs_user 30/min"])
def test_throttle_rates_without_scope_equals_rate_is_improperly_configured(spec):
    with pytest.raises(ImproperlyConfigured, match="scope=rate"):
        _throttle_rates(spec)


def test_throttle_rates_allow_spaces_around_scopes_and_rates():
    assert _throttle_rates(" runs_user = 30/min , key = 10/s ") == {"runs_user": "30/min", "key": "10/s"}


def test_throttle_rates_naming_unknown_scopes_is_improperly_configured_naming_them():
    with pytest.raises(ImproperlyConfigured, match="burst, user"):
        _throttle_rates("runs_user=30/min,user=5/s,burst=10/s")


@pytest.mark.parametrize("spec", ["key=lots", "key=30", "key=/min", "key=30/fortnight", "key=0/min"])
def test_throttle_rates_with_a_malformed_rate_is_improperly_configured(spec):
    with pytest.raises(ImproperlyConfigured):
        _throttle_rates(spec)


# Redis down


def test_while_redis_is_down_requests_are_served_and_counted_in_the_process(settings, user_id, redis_cache_down):
    settings.THROTTLE_RATES = {"key": "2/min"}
    api = keyed(user_id)
    redis_cache_down()

    assert api.get(THREADS).status_code == 200
    assert api.post(THREADS, {"agent_type": "general_chat"}, format="json").status_code == 201
    assert_throttled(api.get(THREADS))


def test_while_redis_is_down_runs_are_answered(settings, client, make_thread, redis_cache_down):
    settings.THROTTLE_RATES = {"runs_user": "30/min", "runs_key": "1200/min", "key": "6000/min"}
    thread = make_thread(agent_type="general_chat")
    redis_cache_down()

    response = run(client, RUN_ENDPOINTS[0], thread)

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "complete"


def test_while_redis_does_not_answer_requests_count_in_the_process_without_asking_it_each_time(
    settings, user_id, silent_redis, redis_cache_down, clock
):
    settings.THROTTLE_RATES = {"key": "3/min"}
    api = keyed(user_id)
    redis_cache_down(silent_redis.url)

    assert api.get(THREADS).status_code == 200  # after the first call to Redis timed out
    offered = silent_redis.connections
    assert api.get(THREADS).status_code == 200
    assert api.get(THREADS).status_code == 200
    assert_throttled(api.get(THREADS))

    assert offered >= 1 and silent_redis.connections == offered  # nobody waited on Redis again
    clock.now += SHARED_COUNTS_RETRY_SECONDS
    api.get(THREADS)
    assert silent_redis.connections > offered  # asked again once the pause is over
