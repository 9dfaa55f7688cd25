"""The TTL cache on trio's mock clock: freshness, staleness, single flight, failures, lifetime."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import pytest
import trio
import trio.testing

from providers.base import Fetched, FetchError
from secretfs.cache import SecretCache


class Loader:
    """A loader whose answers a test scripts; counts calls."""

    def __init__(self, *answers: Fetched | FetchError, delay: float = 0.0) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.delay = delay

    async def __call__(self) -> Fetched:
        self.calls += 1
        if self.delay:
            await trio.sleep(self.delay)
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, FetchError):
            raise answer
        return answer


V1 = Fetched(b"one", "1")
V2 = Fetched(b"two", "2")
DOWN = FetchError("db", "unreachable", transient=True)
GONE = FetchError("db", "not found", transient=False)


async def test_fresh_values_are_served_without_loading(autojump_clock: trio.abc.Clock) -> None:
    cache = SecretCache(ttl=10, max_stale=100)
    load = Loader(V1, V2)
    assert await cache.get("k", load) == V1
    await trio.sleep(9)
    assert await cache.get("k", load) == V1
    assert load.calls == 1
    assert cache.stats.misses == 1 and cache.stats.hits == 1


async def test_concurrent_misses_share_one_fetch(autojump_clock: trio.abc.Clock) -> None:
    load = Loader(V1, delay=1)
    results: list[Fetched] = []
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=100)
        cache.start(n)

        async def reader() -> None:
            results.append(await cache.get("k", load))

        for _ in range(20):
            n.start_soon(reader)
    assert results == [V1] * 20
    assert load.calls == 1


async def test_stale_value_is_served_while_one_refresh_runs(autojump_clock: trio.abc.Clock) -> None:
    changed: list[Hashable] = []
    load = Loader(V1, V2, delay=1)
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=100, on_change=changed.append)
        cache.start(n)
        assert await cache.get("k", load) == V1
        await trio.sleep(11)
        # Stale: the old value at once, many times, and exactly one refresh behind it.
        for _ in range(5):
            assert await cache.get("k", load) == V1
        await trio.sleep(2)
        assert await cache.get("k", load) == V2
        assert load.calls == 2
        assert changed == ["k"]
        n.cancel_scope.cancel()


async def test_outage_serves_stale_until_max_stale_then_fails(
    autojump_clock: trio.abc.Clock,
) -> None:
    load = Loader(V1, DOWN)
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=60, on_change=None)
        cache.start(n)
        await cache.get("k", load)
        for _ in range(4):
            await trio.sleep(12)
            assert await cache.get("k", load) == V1
        await trio.sleep(20)  # now 68 s after the last good fetch
        with pytest.raises(FetchError, match="unreachable"):
            await cache.get("k", load)
        n.cancel_scope.cancel()


async def test_failed_refreshes_back_off(autojump_clock: trio.abc.Clock) -> None:
    load = Loader(V1, DOWN)
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=1, max_stale=1000)
        cache.start(n)
        await cache.get("k", load)
        await trio.sleep(2)
        # Hammer the stale key for 30 s: refreshes are spaced out by growing backoff.
        for _ in range(300):
            await cache.get("k", load)
            await trio.sleep(0.1)
        assert 4 <= load.calls <= 8
        n.cancel_scope.cancel()


async def test_permanent_error_drops_the_value(autojump_clock: trio.abc.Clock) -> None:
    load = Loader(V1, GONE)
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=1000)
        cache.start(n)
        await cache.get("k", load)
        await trio.sleep(11)
        assert await cache.get("k", load) == V1  # triggers the refresh that learns it is gone
        await trio.sleep(1)
        with pytest.raises(FetchError, match="not found"):
            await cache.get("k", load)
        n.cancel_scope.cancel()


async def test_foreground_load_retries_transient_errors(autojump_clock: trio.abc.Clock) -> None:
    cache = SecretCache(ttl=10, max_stale=100)
    load = Loader(DOWN, DOWN, V1)
    assert await cache.get("k", load) == V1
    assert load.calls == 3
    gone = Loader(GONE, V1)
    with pytest.raises(FetchError):
        await cache.get("other", gone)
    assert gone.calls == 1  # a permanent answer is not retried


async def test_dynamic_values_are_never_refreshed(autojump_clock: trio.abc.Clock) -> None:
    load = Loader(V1, V2)
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=1, max_stale=2)
        cache.start(n)
        assert await cache.get("d", load, dynamic=True) == V1
        await trio.sleep(1000)
        assert await cache.get("d", load, dynamic=True) == V1
        assert load.calls == 1
        n.cancel_scope.cancel()


async def test_release_drops_values_no_volume_uses(autojump_clock: trio.abc.Clock) -> None:
    cache = SecretCache(ttl=10, max_stale=100)
    cache.retain(["a", "b"])
    cache.retain(["a"])
    cache.put("a", V1)
    cache.put("b", V2)
    cache.release(["a", "b"])
    assert cache.peek("a") == V1 and cache.peek("b") is None
    cache.release(["a"])
    assert cache.peek("a") is None and len(cache) == 0


async def test_same_version_is_not_a_change(autojump_clock: trio.abc.Clock) -> None:
    changed: list[Hashable] = []
    cache = SecretCache(ttl=10, max_stale=100, on_change=changed.append)
    cache.put("k", V1)
    cache.put("k", Fetched(b"one", "1"))
    assert changed == []
    cache.put("k", Fetched(b"one!", "1"))  # same version label, other bytes: still a change
    assert changed == ["k"]


def test_ttl_and_max_stale_are_checked() -> None:
    with pytest.raises(ValueError):
        SecretCache(ttl=0, max_stale=10)
    with pytest.raises(ValueError):
        SecretCache(ttl=10, max_stale=5)


async def test_a_change_after_expiry_is_still_reported(autojump_clock: trio.abc.Clock) -> None:
    changed: list[Hashable] = []
    cache = SecretCache(ttl=1, max_stale=2, on_change=changed.append)
    assert await cache.get("k", Loader(V1)) == V1
    await trio.sleep(5)  # past max_stale: the value is gone, but the kernel may cache its size
    assert await cache.get("k", Loader(V2)) == V2
    assert changed == ["k"]
    assert await cache.get("k", Loader(V2)) == V2
    await trio.sleep(5)
    assert await cache.get("k", Loader(V2)) == V2  # the same value again is no change
    assert changed == ["k"]


async def test_values_at_max_stale_leave_memory(mock_clock: trio.testing.MockClock) -> None:
    cache = SecretCache(ttl=1, max_stale=10)
    cache.put("a", V1)
    cache.put("b", V1)
    mock_clock.jump(5)
    cache.put("a", V2)  # a refresh: a now expires 5 s after b
    mock_clock.jump(5)  # b is exactly max_stale old: gone
    assert cache.peek("b") is None and cache.peek("a") == V2
    assert "b" not in cache._static
    cache.put("c", V1)
    mock_clock.jump(6)  # a is past max_stale too, and nobody looks it up ...
    cache.put("d", V1)  # ... but the next store drops it, without the bytes lingering
    assert set(cache._static) == {"c", "d"} and len(cache) == 2
    assert cache.fresh("c") is None and cache.peek("c") == V1  # stale, still served
    mock_clock.jump(10)
    assert len(cache) == 0 and cache.peek("d") is None


# --- TTL per key, refresh groups, on-demand refresh --------------------------------------------


class Batch:
    """A group loader a test scripts: ``answers`` per key (bytes, or a FetchError); records every
    call's keys."""

    def __init__(self, delay: float = 0.0) -> None:
        self.answers: dict[Hashable, bytes | FetchError] = {}
        self.calls: list[tuple[Hashable, ...]] = []
        self.delay = delay
        self.versions = 0

    async def __call__(self, keys: Sequence[Hashable]) -> dict[Hashable, Fetched | FetchError]:
        self.calls.append(tuple(keys))
        if self.delay:
            await trio.sleep(self.delay)
        self.versions += 1
        out: dict[Hashable, Fetched | FetchError] = {}
        for k in keys:
            a = self.answers.get(k, b"same")
            out[k] = a if isinstance(a, FetchError) else Fetched(a, f"v-{a.decode()}")
        return out


def held(cache: SecretCache, keys: Sequence[Hashable], value: Fetched = V1) -> None:
    cache.retain(keys)
    for k in keys:
        cache.put(k, value)


async def test_a_key_has_the_shortest_ttl_of_its_holders(autojump_clock: trio.abc.Clock) -> None:
    cache = SecretCache(ttl=100, max_stale=1000)
    cache.retain(["k"], 30)
    cache.retain(["k"])  # the default, 100
    cache.put("k", V1)
    assert cache.ttl_of("k") == 30 and cache.ttl_of("other") == 100
    await trio.sleep(31)
    assert cache.fresh("k") is None  # past the shorter TTL while both hold it
    cache.release(["k"], 30)
    assert cache.ttl_of("k") == 100 and cache.fresh("k") == V1
    assert cache.fresh("k", ttl=20) is None  # a publish asking for less sees it as stale
    cache.retain(["k"], 5000)  # never past max_stale
    assert cache.ttl_of("k") == 100
    cache.release(["k"], 5000)
    cache.release(["k"])
    assert cache.ttl_of("k") == 100 and cache.peek("k") is None


async def test_a_due_key_refreshes_its_whole_group_in_one_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    keys = [f"p{i}" for i in range(12)]
    batch = Batch(delay=1)
    single = Loader(V2)
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=1000)
        cache.start(n)
        held(cache, keys[:11])
        cache.retain([keys[11]])  # held but never fetched: due as well
        cache.group(keys, batch)
        await trio.sleep(11)
        batch.answers["p3"] = b"new"
        assert await cache.get("p0", single) == V1  # stale: served, and the batch starts
        # Every key of the batch is in flight: a reader of one waits for it, nobody fetches twice.
        assert (await cache.get("p11", single)).data == b"same"
        assert (await cache.get("p3", single)).data == b"new"
        assert single.calls == 0 and batch.calls == [tuple(keys)]
        assert cache.fresh("p7") is not None
        n.cancel_scope.cancel()


async def test_a_batch_takes_only_due_keys(autojump_clock: trio.abc.Clock) -> None:
    batch = Batch()
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=1000)
        cache.start(n)
        held(cache, ["old", "backoff", "young"])
        cache.group(["old", "backoff", "young", "dyn"], batch)
        cache.retain(["dyn"])
        cache.put("dyn", V1, dynamic=True)
        await trio.sleep(8)
        cache.put("young", V1)  # fetched again 8 s later: fresh when the others are due
        await trio.sleep(2.5)
        cache._record_failure("backoff", DOWN)  # just failed: backing off
        cache.peek("old")
        await trio.sleep(0.1)
        assert batch.calls == [("old",)]
        n.cancel_scope.cancel()


async def test_batch_results_are_handled_per_key(autojump_clock: trio.abc.Clock) -> None:
    batch = Batch()
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=1000)
        cache.start(n)
        held(cache, ["ok", "down", "gone"])
        cache.group(["ok", "down", "gone"], batch)
        batch.answers.update({"ok": b"new", "down": DOWN, "gone": GONE})
        await trio.sleep(11)
        cache.peek("ok")
        await trio.sleep(0.1)
        assert len(batch.calls) == 1
        assert cache.peek("ok").data == b"new"  # type: ignore[union-attr]
        assert cache.peek("down") == V1  # an outage: the old value is still served
        assert cache.peek("gone") is None  # a permanent answer: dropped at once
        # A reader of the dropped one fetches it again, through its group (alone: the others
        # are fresh or backing off).
        with pytest.raises(FetchError, match="not found"):
            await cache.get("gone", Loader(GONE))
        assert batch.calls[1:] == [("gone",)]
        cache.peek("down")  # backing off: no fetch
        await trio.sleep(0.1)
        assert len(batch.calls) == 2
        n.cancel_scope.cancel()


async def test_a_batch_loader_failure_fails_every_key(autojump_clock: trio.abc.Clock) -> None:
    async def broken(keys: Sequence[Hashable]) -> dict[Hashable, Fetched | FetchError]:
        raise DOWN

    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=1000)
        cache.start(n)
        held(cache, ["a", "b"])
        cache.group(["a", "b"], broken)
        await trio.sleep(11)
        cache.peek("a")
        await trio.sleep(0.1)
        assert cache.peek("a") == V1 and cache.peek("b") == V1
        assert cache._errors.keys() == {"a", "b"} and cache.stats.fetch_errors == 2
        n.cancel_scope.cancel()


async def test_a_key_released_during_its_batch_is_not_stored(
    autojump_clock: trio.abc.Clock,
) -> None:
    batch = Batch(delay=1)
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=10, max_stale=1000)
        cache.start(n)
        held(cache, ["a", "b"])
        cache.group(["a", "b"], batch)
        await trio.sleep(11)
        cache.peek("a")
        cache.release(["b"])
        await trio.sleep(2)
        assert "b" not in cache._static and "b" not in cache._discard
        assert cache.fresh("a") is not None
        n.cancel_scope.cancel()


async def test_on_demand_refresh(autojump_clock: trio.abc.Clock) -> None:
    batch = Batch(delay=1)
    async with trio.open_nursery() as n:
        cache = SecretCache(ttl=100, max_stale=1000)
        cache.start(n)
        held(cache, ["a", "b", "c"], Fetched(b"same", "v-same"))
        cache.retain(["d"])
        cache.put("d", V1, dynamic=True)
        cache.group(["a", "b", "c"], batch)
        cache._record_failure("c", DOWN)  # backing off: an explicit refresh goes anyway
        batch.answers["b"] = b"new"
        out = await cache.refresh(["a", "b", "c", "d", "not-held"])
        # Fresh values fetched all the same, in one call; the dynamic one left alone.
        assert out == {"a": "fetched", "b": "changed", "c": "fetched"}
        assert batch.calls == [("a", "b", "c")]
        # A refresh while a fetch is in flight waits for it instead of fetching again.
        batch.answers.update({"a": b"newer", "c": DOWN})
        results: list[dict[Hashable, str]] = []

        async def refresh() -> None:
            results.append(await cache.refresh(["a", "c"]))

        n.start_soon(refresh)
        n.start_soon(refresh)
        await trio.sleep(2)
        assert len(batch.calls) == 2
        assert results == [{"a": "changed", "c": "failed"}] * 2
        # With an explicit loader, and a time limit.
        slow = Batch(delay=50)
        out = await cache.refresh(["a", "b"], slow, give_up_after=5)
        assert out == {"a": "failed", "b": "failed"} and slow.calls == [("a", "b")]
        await trio.sleep(50)
        assert cache.peek("a").data == b"same"  # type: ignore[union-attr]
        n.cancel_scope.cancel()
