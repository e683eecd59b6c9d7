import json

import pytest

from vital.schema import AppendLog, read_jsonl, request_hash, write_atomic, write_jsonl


def test_request_hash_is_stable_and_content_sensitive():
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "sampling": {"t": 0}}
    assert request_hash(a) == request_hash(json.loads(json.dumps(a)))
    assert request_hash(a) != request_hash({**a, "sampling": {"t": 1}})


def test_append_log_survives_a_torn_last_line(tmp_path):
    log = AppendLog(tmp_path / "cache.jsonl")
    log.append({"request_hash": "h1", "v": 1})
    log.close()
    with open(tmp_path / "cache.jsonl", "a") as f:  # what kill -9 mid-write leaves behind
        f.write('{"request_hash": "h2", "v"')
    assert set(log.load("request_hash")) == {"h1"}
    log.append({"request_hash": "h3", "v": 3})  # the torn bytes are cut off first
    log.close()
    assert set(log.load("request_hash")) == {"h1", "h3"}
    assert "h2" not in (tmp_path / "cache.jsonl").read_text()


def test_append_log_reports_corruption_in_the_middle_with_file_and_line(tmp_path):
    p = tmp_path / "cache.jsonl"
    p.write_text('{"request_hash": "h1"}\n{"request_hash": "h2", garbage\n{"request_hash": "h3"}\n')
    with pytest.raises(ValueError, match=f"{p}:2: corrupt record"):
        AppendLog(p).load("request_hash")


def test_write_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "f.jsonl"
    write_jsonl(p, [{"x": 1}, {"x": 2}])
    assert [r["x"] for r in read_jsonl(p)] == [1, 2]
    write_atomic(p, "")
    assert p.read_text() == "" and not list(p.parent.glob(".f.jsonl.*"))


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{oops\n')
    try:
        list(read_jsonl(p))
    except ValueError as e:
        assert f"{p}:2" in str(e)
    else:
        raise AssertionError("bad line not reported")


def test_tests_cannot_reach_the_network():
    import socket

    import pytest

    with pytest.raises(OSError, match="hermetic"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
