"""The journal on disk: atomic appends from many processes, torn lines, the cursor, the deliver lock."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.cursor import load_cursor, save_cursor
from reporter.journal import JournalWriter
from reporter.ledger import read_host_counters
from reporter.reader import JournalReader, iter_records, journal_head
from reporter.record import RECORD_FIELDS, check_record, read_line
from reporter.runlock import RunLock, lock_holder_pid

WRITERS = 4
RECORDS_PER_WRITER = 2000


def _write_many(run_dir: str, writer_index: int) -> None:
    writer = JournalWriter(run_dir, rank=writer_index)
    long_name = "n" * (300 + writer_index)  # lines of different lengths make interleaving visible
    for step in range(RECORDS_PER_WRITER):
        writer.append("intermediate", float(step), long_name, step)


def test_concurrent_writers_from_several_processes_never_interleave(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), i)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = (tmp_path / "metrics.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]
    assert len(records) == WRITERS * RECORDS_PER_WRITER
    for rank in range(WRITERS):
        steps = [r["step"] for r in records if r["rank"] == rank]
        assert steps == list(range(RECORDS_PER_WRITER))  # each writer's order is kept
    assert len({r["key"] for r in records}) == len(records)


def test_record_has_every_contract_field(tmp_path):
    writer = JournalWriter(str(tmp_path), rank=2)
    key = writer.append("final", 0.5, "metric", 7)
    line = json.loads((tmp_path / "metrics.jsonl").read_bytes())
    assert list(line) == list(RECORD_FIELDS)  # the writer's hand-made line has the Record's fields, in order
    (record,) = [r for _, r in iter_records(str(tmp_path))]
    assert record == check_record(line)[0] and record.as_json() == line
    assert record.kind == "final" and record.value == 0.5 and record.step == 7
    assert record.rank == 2 and record.pid == os.getpid() and record.key == key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_journalled_as_null(tmp_path, value):
    JournalWriter(str(tmp_path)).append("intermediate", value, None, None)
    (record,) = [r for _, r in iter_records(str(tmp_path))]
    assert record.value is None


@settings(max_examples=200, deadline=None)
@given(
    value=st.floats(allow_nan=False, allow_infinity=False),
    name=st.one_of(st.none(), st.text(max_size=40)),
    step=st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63)),
)
def test_any_value_name_and_step_round_trip_through_one_json_line(tmp_path_factory, value, name, step):
    run_dir = str(tmp_path_factory.mktemp("rt"))
    JournalWriter(run_dir).append("intermediate", value, name, step)
    data = open(os.path.join(run_dir, "metrics.jsonl"), "rb").read()
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    record = json.loads(data)
    kept_step = step if step is None or step < 2**63 else None  # beyond a signed 64-bit int: null, for every source
    assert (record["value"], record["name"], record["step"]) == (value, name, kept_step)


def test_torn_last_line_is_skipped_with_a_warning_and_the_next_record_survives(tmp_path, capsys):
    writer = JournalWriter(str(tmp_path))
    writer.append("intermediate", 1.0, None, 1)
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind":"intermediate","value":2.0,"na')  # a writer killed mid-line
    reader = JournalReader(str(tmp_path))
    assert [e.record.value for e in reader.read_available()] == [1.0]  # the tail waits
    JournalWriter(str(tmp_path)).append("intermediate", 3.0, None, 3)  # a new writer appends after the fragment
    entries = reader.read_available()
    assert [e.record.value for e in entries] == [3.0]
    assert reader.torn_lines == 1
    assert "torn" in capsys.readouterr().err


def test_a_torn_line_glued_to_the_next_record_recovers_that_record():
    glued = b'{"kind":"intermediate","val{"kind":"final","value":5.0,"name":null,"step":null,"ts":1.0,"rank":0,"pid":1,"key":"k"}'
    record, _, torn = read_line(glued)
    assert record.value == 5.0 and torn
    assert read_line(b"not json at all")[::2] == (None, True)


def test_corrupt_cursor_restarts_from_zero_with_a_warning(tmp_path, capsys):
    JournalWriter(str(tmp_path)).append("intermediate", 1.0, None, None)
    (tmp_path / "cursor").write_text("garbage")
    assert load_cursor(str(tmp_path)).offset == 0
    assert "corrupt" in capsys.readouterr().err


def test_cursor_past_the_end_restarts_from_zero(tmp_path):
    JournalWriter(str(tmp_path)).append("intermediate", 1.0, None, None)
    save_cursor(str(tmp_path), 10_000)
    assert load_cursor(str(tmp_path)).offset == 0


def test_cursor_round_trips_atomically(tmp_path):
    JournalWriter(str(tmp_path)).append("intermediate", 1.0, None, None)
    size = os.path.getsize(tmp_path / "metrics.jsonl")
    save_cursor(str(tmp_path), size)
    assert load_cursor(str(tmp_path)).offset == size
    assert sorted(os.listdir(tmp_path)) == ["cursor", "metrics.jsonl"]  # no temporary file left behind


def test_reader_follows_a_growing_file(tmp_path):
    writer = JournalWriter(str(tmp_path))
    reader = JournalReader(str(tmp_path))
    assert reader.read_available() == []
    writer.append("intermediate", 1.0, None, None)
    assert len(reader.read_available()) == 1
    writer.append("intermediate", 2.0, None, None)
    (entry,) = reader.read_available()
    assert entry.record.value == 2.0 and entry.end_offset == os.path.getsize(tmp_path / "metrics.jsonl")


def test_deliver_lock_is_exclusive_between_processes(tmp_path):
    lock = RunLock(str(tmp_path))
    assert lock.try_acquire()
    assert lock_holder_pid(str(tmp_path)) == os.getpid()
    code = "import sys; from reporter.runlock import RunLock; sys.exit(0 if RunLock(sys.argv[1]).try_acquire() else 7)"
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 7
    lock.release()
    assert lock_holder_pid(str(tmp_path)) is None
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 0


def test_forked_child_neither_holds_the_lock_nor_reuses_keys(tmp_path):
    lock = RunLock(str(tmp_path))
    writer = JournalWriter(str(tmp_path))
    assert lock.try_acquire()
    writer.append("intermediate", 1.0, None, None)
    pid = os.fork()
    if pid == 0:  # the child: report its verdict through the exit code
        ok = not lock.held and writer.append("intermediate", 2.0, None, None) is not None
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lock.held and lock_holder_pid(str(tmp_path)) == os.getpid()  # the child's exit did not free it
    records = [r for _, r in iter_records(str(tmp_path))]
    assert [r.pid for r in records] == [os.getpid(), pid]
    assert len({r.key for r in records}) == 2
    lock.release()


def test_a_short_write_is_counted_as_lost_and_never_raises(tmp_path, monkeypatch, capsys):
    writer = JournalWriter(str(tmp_path))
    assert writer.append("intermediate", 1.0, None, None)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:10]))  # what a full disk does
    assert writer.append("intermediate", 2.0, None, None) is None
    monkeypatch.setattr(os, "write", real_write)
    assert writer.append("intermediate", 3.0, None, None)
    assert writer.lost == {"short write (is the disk full?)": 1}
    assert [r.value for _, r in iter_records(str(tmp_path))] == [1.0, 3.0]  # the fragment is skipped
    assert "could not be journalled" in capsys.readouterr().err


# --- validation of what is read back -----------------------------------------------------------------

GOOD = {"kind": "intermediate", "value": 0.5, "name": None, "step": 1, "ts": 1.0, "rank": 0, "pid": 1, "key": "k-1"}


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"value": "0.2x"}, "value is not a number"),
        ({"value": True}, "value is not a number"),
        ({"value": 10**400}, "value is not a finite number"),
        ({"kind": "bogus"}, "unknown kind"),
        ({"step": 1.5}, "step is not an integer"),
        ({"step": "3"}, "step is not an integer"),
        ({"name": 3}, "name is not a string"),
        ({"rank": "0"}, "rank is not an integer"),
        ({"ts": 1e300}, "ts is not a time"),
        ({"key": "a\nb"}, "key is not a header-safe string"),
        ({"key": "clé"}, "key is not a header-safe string"),
        ({"kind": "state", "value": 1.5}, "state value is not an integer"),
    ],
)
def test_a_record_with_a_bad_field_is_refused_with_its_reason(change, reason):
    assert check_record({**GOOD, **change}) == (None, reason)


def test_a_nan_literal_in_the_journal_is_not_a_finite_number():
    assert read_line(b'{"kind":"intermediate","value":NaN}') == (None, "value is not a finite number", False)


def test_a_valid_record_keeps_exactly_the_known_fields():
    record, problem = check_record({**GOOD, "value": 2, "extra": "dropped"})
    assert problem is None and record.as_json() == {**GOOD, "value": 2.0}


def test_the_reader_skips_invalid_records_counts_them_by_reason_and_reads_on(tmp_path, capsys):
    writer = JournalWriter(str(tmp_path))
    writer.append("intermediate", 1.0, None, 1)
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "intermediate", "value": "0.2x", "name": null, "step": 2}\n')
        f.write(b'{"kind": "intermediate", "value": "0.3x", "name": null, "step": 3}\n')
        f.write(b"[" * 100_000 + b"\n")  # deeper than the JSON parser's recursion limit
    writer.append("intermediate", 4.0, None, 4)
    reader = JournalReader(str(tmp_path))
    entries = reader.read_available()
    assert [e.record and e.record.value for e in entries] == [1.0, None, None, None, 4.0]
    assert [e.problem for e in entries][1:4] == ["value is not a number"] * 2 + ["torn or invalid line"]
    assert reader.invalid == {"value is not a number": 2}
    assert capsys.readouterr().err.count("value is not a number") == 1  # said once per reason


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
RECORDISH = st.fixed_dictionaries(
    {"kind": st.sampled_from(["intermediate", "final", "state", "other"])},
    optional={field: JSON_VALUES for field in ("value", "name", "step", "ts", "rank", "pid", "key")},
)


def _assert_valid(record):
    again, problem = check_record(record.as_json())
    assert problem is None and again == record  # what the reader returns is itself a valid record
    assert record.value is None or record.value - record.value == 0


@settings(max_examples=300, deadline=None)
@given(line=st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    RECORDISH.map(lambda v: json.dumps(v).encode()),
    st.tuples(st.binary(max_size=40), RECORDISH).map(lambda t: t[0] + json.dumps(t[1], separators=(",", ":")).encode()),
))
def test_any_journal_line_gives_a_valid_record_or_a_reason_and_never_raises(line):
    record, problem, _torn = read_line(line)
    assert (record is None) != (problem is None)
    if record is not None:
        _assert_valid(record)


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.one_of(st.binary(max_size=80), RECORDISH.map(lambda v: json.dumps(v).encode())), max_size=8))
def test_the_reader_turns_any_journal_bytes_into_records_or_counted_skips(tmp_path_factory, lines):
    run_dir = tmp_path_factory.mktemp("fuzz")
    data = b"\n".join(lines) + b"\n"
    (run_dir / "metrics.jsonl").write_bytes(data)
    reader = JournalReader(str(run_dir))
    entries = []
    while True:
        more = reader.read_available(max_records=3)
        if not more:
            break
        entries.extend(more)
    assert reader.offset == len(data)  # every byte read, nothing stuck
    for entry in entries:
        assert (entry.record is None) != (entry.problem is None)
        if entry.record is not None:
            _assert_valid(entry.record)
    assert sum(reader.invalid.values()) + reader.torn_lines >= sum(1 for e in entries if e.record is None)


def test_records_a_writer_could_not_journal_are_saved_for_the_run_status(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    writer = JournalWriter(str(blocker / "run"))  # a run directory under a file: nothing can be written
    for _ in range(3):
        assert writer.append("intermediate", 1.0, None, None) is None
    assert writer.lost == {"cannot open the journal (Not a directory)": 3}
    good = JournalWriter(str(tmp_path / "run"))
    good.count_lost("ENOSPC (No space left on device)")
    good.count_lost("ENOSPC (No space left on device)")
    good.close()
    assert read_host_counters(str(tmp_path / "run")) == {"lost": {"ENOSPC (No space left on device)": 2}}


def test_the_cursor_names_its_journal_and_an_older_plain_offset_still_counts(tmp_path):
    JournalWriter(str(tmp_path)).append("intermediate", 1.0, None, None)
    size = os.path.getsize(tmp_path / "metrics.jsonl")
    with open(tmp_path / "metrics.jsonl", "rb") as f:
        head = journal_head(f.fileno())
    save_cursor(str(tmp_path), size, head=head)
    assert tuple(load_cursor(str(tmp_path))) == (size, head)
    (tmp_path / "cursor").write_text(f"{size}\n")  # a cursor of an earlier version: the journal there
    assert tuple(load_cursor(str(tmp_path))) == (size, None)
    save_cursor(str(tmp_path), size, head=head ^ 1)  # another journal's
    assert load_cursor(str(tmp_path)).offset == 0


def test_the_reader_finishes_a_replaced_file_then_reads_the_new_one_from_its_start(tmp_path):
    writer = JournalWriter(str(tmp_path))
    writer.append("intermediate", 1.0, None, None)
    reader = JournalReader(str(tmp_path))
    assert [e.record.value for e in reader.read_available()] == [1.0]
    writer.append("intermediate", 2.0, None, None)  # written to the old file after the reader's last look
    os.rename(tmp_path / "metrics.jsonl", tmp_path / "metrics.jsonl.1")
    assert not reader.replaced()  # the path names no file: nothing to switch to yet
    JournalWriter(str(tmp_path)).append("intermediate", 3.0, None, None)
    assert reader.replaced()
    assert [e.record.value for e in reader.read_available()] == [2.0]
    assert reader.read_available() == []
    reader.follow_replacement()
    assert reader.offset == 0 and not reader.replaced()
    assert [e.record.value for e in reader.read_available()] == [3.0]
    reader.close()


def test_names_are_journalled_right_across_the_writers_bounded_name_cache(tmp_path):
    from reporter.journal import MAX_CACHED_NAMES

    writer = JournalWriter(str(tmp_path))
    names = [f"metric/{i}" for i in range(MAX_CACHED_NAMES + 10)]
    for i, name in enumerate(names):
        writer.append("intermediate", 0.5, name, i)
    writer.close()
    assert [r.name for _, r in iter_records(str(tmp_path))] == names  # the cache was emptied once on the way


def _line(key: str, value: float) -> bytes:
    return (json.dumps({"kind": "intermediate", "value": value, "name": None, "step": 1, "ts": 1000.0, "rank": 0,
                        "pid": 1, "key": key}, separators=(",", ":")) + "\n").encode()


@pytest.mark.parametrize("regrown", ["shorter", "same length", "longer"])
def test_a_journal_truncated_in_place_is_read_again_from_its_start(tmp_path, capsys, regrown):
    """logrotate's copytruncate: the reader once resumed at its old offset, mid-line or (a line end there by
    chance, as with records of one length) skipping every record before it."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_line("a-1", 1.0) + _line("a-2", 2.0))
    reader = JournalReader(str(tmp_path))
    assert [e.record.key for e in reader.read_available()] == ["a-1", "a-2"]
    assert reader.read_available() == []  # at the end
    new = {"shorter": [_line("b-1", 3.0)], "same length": [_line("b-1", 3.0), _line("b-2", 4.0)],
           "longer": [_line("b-1", 3.0), _line("b-2", 4.0), _line("b-3", 5.0)]}[regrown]
    with open(path, "r+b") as f:  # truncated in place, then written again: the same inode
        f.truncate(0)
        f.write(b"".join(new))
    assert [e.record.key for e in reader.read_available()] == [f"b-{i + 1}" for i in range(len(new))]
    assert reader.truncations == 1 and reader.offset == path.stat().st_size
    assert capsys.readouterr().err.count("truncated in place") == 1
    reader.close()


def test_a_journal_truncated_to_nothing_reads_as_empty_from_its_start(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_line("a-1", 1.0))
    reader = JournalReader(str(tmp_path))
    assert len(reader.read_available()) == 1
    os.truncate(path, 0)
    assert reader.read_available() == [] and reader.offset == 0 and reader.truncations == 1
    path.write_bytes(_line("b-1", 2.0))
    assert [e.record.key for e in reader.read_available()] == ["b-1"]
    reader.close()


def test_iter_entries_reads_every_line_after_an_offset_invalid_ones_included(tmp_path):
    from reporter.reader import iter_entries

    writer = JournalWriter(str(tmp_path))
    writer.append("intermediate", 1.0, None, 1)
    first_end = os.path.getsize(tmp_path / "metrics.jsonl")
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind":"bogus"}\n')
    writer.append("intermediate", 2.0, None, 2)
    entries = list(iter_entries(str(tmp_path), first_end, batch=1))
    assert [(e.record.value if e.record else None, e.problem) for e in entries] == [(None, "unknown kind"), (2.0, None)]
    assert entries[-1].end_offset == os.path.getsize(tmp_path / "metrics.jsonl")
    assert [r.value for _, r in iter_records(str(tmp_path))] == [1.0, 2.0]


def test_a_second_destination_keeps_its_own_cursor_file(tmp_path):
    JournalWriter(str(tmp_path)).append("intermediate", 1.0, None, None)
    size = os.path.getsize(tmp_path / "metrics.jsonl")
    save_cursor(str(tmp_path), size, file_name="cursor.other")
    assert load_cursor(str(tmp_path), "cursor.other").offset == size
    assert load_cursor(str(tmp_path)).offset == 0  # the primary cursor is untouched


def _slow_read(line: bytes):
    """What a journal line reads as without the writer's fast road: json.loads, then check_record."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return check_record(obj)


_NUMBER_TEXTS = st.one_of(
    st.sampled_from(["null", "0", "-0", "1.0", "-0.0", "1e400", "-1e400", "1E5", "3.5e-7", "2147483647", "2147483648",
                     "-2147483648", "-2147483649", "1.5e10", "100000000000", "100000000001", "1e11", "1.0e11",
                     "9223372036854775807", "9223372036854775808", "-9223372036854775809", "01", "1.", ".5", "NaN",
                     "Infinity", "true", '"1"', "1" * 400]),
    st.integers().map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
_TEXTS = st.one_of(st.just("null"), st.text(max_size=12).map(json.dumps),
                   st.text(max_size=12).map(lambda t: json.dumps(t, ensure_ascii=False)),
                   st.sampled_from(['"a\\"b"', '"x\\\\y"', '"' + "n" * 260 + '"', '"' + "k" * 201 + '"', '"has space"']))


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(["intermediate", "final", "state", "other"]), value=_NUMBER_TEXTS, name=_TEXTS,
       step=_NUMBER_TEXTS, ts=_NUMBER_TEXTS, rank=_NUMBER_TEXTS, pid=_NUMBER_TEXTS, key=_TEXTS)
def test_a_line_in_the_writers_shape_reads_as_json_loads_and_check_record_read_it(kind, value, name, step, ts, rank, pid, key):
    line = (f'{{"kind":"{kind}","value":{value},"name":{name},"step":{step},"ts":{ts},"rank":{rank},"pid":{pid},'
            f'"key":{key}}}').encode("utf-8", "surrogatepass")
    slow = _slow_read(line)
    record, problem, torn = read_line(line)
    if slow is None:
        assert record is None and torn
    else:
        assert (repr(record), problem) == (repr(slow[0]), slow[1]) and not torn  # repr: the sign of a zero too


def test_the_writers_own_lines_take_the_fast_road(tmp_path):
    from reporter import record as record_module

    writer = JournalWriter(str(tmp_path))
    writer.append("intermediate", 0.25, "loss/ü", 7)
    writer.append("intermediate", 0.5, "lr", 7)
    writer.append("state", 2, None, None)
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines()
    assert [record_module._writer_line(line) is not None for line in lines] == [False, True, True]  # an escaped name: JSON
    assert [read_line(line)[0] for line in lines] == [_slow_read(line)[0] for line in lines]
