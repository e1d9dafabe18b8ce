"""The cache build lock: one holder at a time, locally (flock) and on S3 (If-None-Match: *)."""

from __future__ import annotations

import threading
import time

import pytest

from selfe.data.cachelock import CacheLockTimeout, build_lock


def _contend(uri: str, **kw) -> list[str]:
    """Two builders of the same cache; returns the order of events."""
    events: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with build_lock(uri, **kw):
            events.append("first in")
            first_in.set()
            time.sleep(1.0)
            events.append("first out")

    def second() -> None:
        first_in.wait(10)
        with build_lock(uri, **kw):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return events


def test_a_local_builder_waits_for_the_holder(tmp_path, capsys):
    assert _contend(str(tmp_path / "cache"), poll_s=0.1) == ["first in", "first out", "second in"]
    assert "waiting for another build of this cache" in capsys.readouterr().out


def test_a_local_lock_times_out_with_a_clear_error(tmp_path):
    uri = str(tmp_path / "cache")
    with build_lock(uri):
        def blocked() -> None:
            with build_lock(uri, timeout_s=0.3, poll_s=0.1):
                pass

        errors: list = []
        t = threading.Thread(target=lambda: errors.append(pytest.raises(CacheLockTimeout, blocked)))
        t.start()
        t.join(10)
    assert errors and "held for over 0 s by another build" in str(errors[0].value)


def test_an_s3_builder_waits_for_the_holder_and_a_stale_lock_is_taken_over(s3_server, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="locks")
    assert _contend("s3://locks/cache/abc", poll_s=0.1) == ["first in", "first out", "second in"]
    assert "Contents" not in s3.list_objects_v2(Bucket="locks")  # released
    s3.put_object(Bucket="locks", Key="cache/dead.lock", Body=b"{}")  # its builder died long ago
    with build_lock("s3://locks/cache/dead", stale_s=0.0, poll_s=0.1):
        pass
