"""TensorBoard event files: the stdlib reader (framing, CRC-32C, protobuf fields), the tailer's position
and lock in the run directory, and ``run``/``sidecar --tensorboard-dir`` with real writers end to end."""

import contextlib
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
from conftest import cli, task_env, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from tbevents_support import frame_record, read_scalars

from reporter.journal import JournalWriter, iter_records, read_host_counters
from reporter.tbevents import EventFileTailer
from reporter.tbformat import RecordScanner, crc32c, parse_event

# --- a tiny protobuf encoder of our own (the reader must not be checked against itself) -------------


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number, wire):
    return varint(number << 3 | wire)


def ld(number, payload):
    return key(number, 2) + varint(len(payload)) + payload


def simple_value(tag, value):
    return ld(1, ld(1, tag.encode()) + key(2, 5) + struct.pack("<f", value))


def tensor_value(tag, tensor, plugin="scalars"):
    metadata = ld(1, ld(1, plugin.encode())) if plugin is not None else b""
    return ld(1, ld(1, tag.encode()) + (ld(9, metadata) if plugin is not None else b"") + ld(8, tensor))


def tensor(dtype, *fields, shape=()):
    dims = b"".join(ld(2, key(1, 0) + varint(size)) for size in shape)
    return key(1, 0) + varint(dtype) + ld(2, dims) + b"".join(fields)


def event(step, *values, wall_time=1700000000.5):
    body = key(1, 1) + struct.pack("<d", wall_time) + key(2, 0) + varint(step)
    return body + (ld(5, b"".join(values)) if values else b"")


def file_version_event():
    return key(1, 1) + struct.pack("<d", 1700000000.0) + ld(3, b"brain.Event:2")


def scalar_file(values, tag="loss"):
    """An event file's bytes: the version record, then one record per (step, value)."""
    return frame_record(file_version_event()) + b"".join(frame_record(event(s, simple_value(tag, v))) for s, v in values)


def journal(run_dir):
    return [(r.name, r.value, r.step) for _, r in iter_records(str(run_dir)) if r.kind == "intermediate"]


def tailer(tmp_path, **kwargs):
    run_dir = str(tmp_path / "run")
    return EventFileTailer(str(tmp_path / "tb"), run_dir, JournalWriter(run_dir), **kwargs)


def write(path, data, mode="ab"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        f.write(data)


# --- the reader ---------------------------------------------------------------------------------------


def test_crc32c_matches_the_rfc_3720_check_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283  # continued


def test_scalars_come_with_their_tag_step_and_wall_time():
    data = scalar_file([(0, 0.5), (1, 0.25)]) + frame_record(event(7, simple_value("a/b", 1.5), simple_value("c", -2.0), wall_time=1.25e9))
    scalars, result = read_scalars(data)
    assert [(s.tag, s.value, s.step) for s in scalars] == [("loss", 0.5, 0), ("loss", 0.25, 1), ("a/b", 1.5, 7), ("c", -2.0, 7)]
    assert scalars[-1].wall_time == 1.25e9 and result.consumed == len(data) and result.corrupt == 0


def test_a_float32_value_reads_as_its_shortest_decimal():
    (scalar,), _ = read_scalars(frame_record(event(3, simple_value("acc", 0.1))))
    assert scalar.value == 0.1


@pytest.mark.parametrize("dtype, fields, expected", [
    (1, [ld(5, struct.pack("<f", 0.75))], 0.75),                      # DT_FLOAT float_val, packed
    (1, [key(5, 5) + struct.pack("<f", 0.1)], 0.1),                   # DT_FLOAT float_val, unpacked
    (2, [ld(6, struct.pack("<d", 0.123456789012))], 0.123456789012),  # DT_DOUBLE double_val
    (3, [ld(7, varint(-5))], -5.0),                                   # DT_INT32 int_val (negative)
    (9, [ld(10, varint(1 << 40))], float(1 << 40)),                   # DT_INT64 int64_val
    (9, [key(10, 0) + varint(-3)], -3.0),                             # DT_INT64, unpacked
    (22, [ld(16, varint(7))], 7.0),                                   # DT_UINT32 uint32_val
    (19, [ld(13, varint(0x3C00))], 1.0),                              # DT_HALF half_val
    (14, [ld(13, varint(0x3FC0))], 1.5),                              # DT_BFLOAT16 half_val
    (1, [ld(4, struct.pack("<f", 2.5))], 2.5),                        # tensor_content, as TF2's C++ writer does
    (2, [ld(4, struct.pack("<d", -0.5))], -0.5),
    (3, [ld(4, struct.pack("<i", -7))], -7.0),
    (9, [ld(4, struct.pack("<q", 123456789012))], 123456789012.0),
])
def test_tf2_scalar_tensors_of_float_double_and_int_types_are_read(dtype, fields, expected):
    (scalar,) = parse_event(event(4, tensor_value("t", tensor(dtype, *fields))))
    assert (scalar.tag, scalar.value, scalar.step) == ("t", expected, 4)


@pytest.mark.parametrize("value", [
    tensor_value("vector", tensor(1, ld(5, struct.pack("<ff", 1, 2)), shape=(2,))),  # two elements
    tensor_value("text", tensor(7, ld(8, b"hello"))),                                 # DT_STRING
    tensor_value("flag", tensor(10, ld(11, varint(1)))),                              # DT_BOOL
    tensor_value("histo", tensor(2, ld(6, struct.pack("<ddd", 0, 1, 5)), shape=(1, 3)), plugin="histograms"),
    tensor_value("image", tensor(1, ld(5, struct.pack("<f", 1))), plugin="images"),   # another plugin's data
    ld(1, ld(1, b"img") + ld(4, b"\x89PNG")),                                         # an image summary
])
def test_what_is_not_a_scalar_is_left_out(value):
    assert parse_event(event(1, value, simple_value("kept", 1.0))) == [parse_event(event(1, simple_value("kept", 1.0)))[0]]


def test_files_of_the_real_writers_frame_every_record_as_we_do(tmp_path):
    tensorboardX = pytest.importorskip("tensorboardX", reason="tensorboardX is not installed")
    writer = tensorboardX.SummaryWriter(str(tmp_path))
    for step in range(3):
        writer.add_scalar("x", step / 4, step)
    writer.close()
    (name,) = os.listdir(tmp_path)
    data = (tmp_path / name).read_bytes()
    scanner = RecordScanner()
    result = scanner.scan(data)
    assert result.consumed == len(data) and result.corrupt == 0
    assert b"".join(frame_record(p) for p in result.payloads) == data
    scalars, _ = read_scalars(data)
    assert [(s.tag, s.value, s.step) for s in scalars] == [("x", 0.0, 0), ("x", 0.25, 1), ("x", 0.5, 2)]


# --- properties: any input, never an exception; any split, the same records ----------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_never_raise_in_the_scanner_or_the_event_parser(data):
    result = RecordScanner().scan(data)
    assert 0 <= result.consumed <= len(data) or result.skipped_large
    assert parse_event(data) is None or isinstance(parse_event(data), list)
    for payload in result.payloads:
        parse_event(payload)


_records = st.lists(
    st.tuples(st.integers(0, 10**6), st.floats(allow_nan=False, width=32), st.sampled_from(["ok", "payload", "length"])),
    max_size=12,
)


def _damaged(records):
    data = bytearray(frame_record(file_version_event()))
    for step, value, damage in records:
        framed = bytearray(frame_record(event(step, simple_value("m", value))))
        if damage == "payload":
            framed[14] ^= 0xFF
        elif damage == "length":
            framed[3] ^= 0x01
        data += framed
    return bytes(data)


@settings(max_examples=150, deadline=None)
@given(_records, st.lists(st.integers(1, 60), max_size=30), st.binary(max_size=30))
def test_reading_in_any_pieces_gives_the_records_of_reading_the_whole(records, pieces, tail):
    data = _damaged(records) + tail  # tail: a record cut short, or garbage
    whole = RecordScanner().scan(data)
    scanner, payloads, corrupt, buffered, fed = RecordScanner(), [], 0, b"", 0
    for size in pieces + [len(data)]:
        buffered += data[fed:fed + size]
        fed = min(len(data), fed + size)
        result = scanner.scan(buffered)
        payloads += result.payloads
        corrupt += result.corrupt
        buffered = buffered[result.consumed:]
    assert payloads == whole.payloads and corrupt == whole.corrupt
    kept = [(step, struct.pack("<f", value)) for step, value, damage in records if damage == "ok"]
    read = [(s.step, struct.pack("<f", s.value)) for p in whole.payloads for s in parse_event(p) or []]
    assert read == kept  # every undamaged record, once, in order; the damaged ones skipped
    damages = [damage for _, _, damage in records]
    lost_framing = sum(d == "length" and (i == 0 or damages[i - 1] != "length") for i, d in enumerate(damages))
    assert whole.corrupt == damages.count("payload") + lost_framing or tail  # a stretch of lost framing counts once


# --- the tailer ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_sidecar(env, cwd):
    """``anylearn-reporter sidecar`` as a real process, killed at the end if it has not ended by itself."""
    sidecar = subprocess.Popen([sys.executable, "-m", "reporter", "sidecar", "--heartbeat", "60", "--interval", "60"],
                               env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield sidecar
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()


def test_a_record_cut_short_waits_for_the_rest(tmp_path):
    data = scalar_file([(0, 1.0), (1, 2.0)])
    path = tmp_path / "tb" / "events.out.tfevents.1.host"
    write(path, data[:-5])
    reader = tailer(tmp_path)
    assert reader.poll_once() == 1
    assert journal(tmp_path / "run") == [("loss", 1.0, 0)]
    write(path, data[-5:])
    assert reader.poll_once() == 1
    assert journal(tmp_path / "run") == [("loss", 1.0, 0), ("loss", 2.0, 1)]
    reader.stop()


def test_a_damaged_record_is_skipped_and_counted_and_the_rest_is_read(tmp_path, capsys):
    good = scalar_file([(0, 1.0)])
    bad_payload = bytearray(frame_record(event(1, simple_value("loss", 2.0))))
    bad_payload[20] ^= 0x55
    bad_length = bytearray(frame_record(event(2, simple_value("loss", 3.0))))
    bad_length[0] ^= 0x01
    data = good + bytes(bad_payload) + bytes(bad_length) + frame_record(event(3, simple_value("loss", 4.0)))
    write(tmp_path / "tb" / "events.out.tfevents.2.host", data)
    reader = tailer(tmp_path)
    reader.poll_once()
    reader.stop()
    assert journal(tmp_path / "run") == [("loss", 1.0, 0), ("loss", 4.0, 3)]
    assert reader.corrupt_records == 2
    assert "damaged record" in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "tensorboard.json").read_text())
    assert saved["files"]["events.out.tfevents.2.host"] == {"offset": len(data), "corrupt": 2, "ignored": False}
    assert read_host_counters(str(tmp_path / "run"))["unreadable"] == {"tensorboard record": 2}  # status.json, summary.json


def test_a_file_that_is_not_an_event_file_is_ignored_and_said_once(tmp_path, capsys):
    write(tmp_path / "tb" / "events.out.tfevents.3.notes", b"these are my notes, not an event file\n" * 3)
    write(tmp_path / "tb" / "events.out.tfevents.4.host", scalar_file([(5, 0.5)]))
    reader = tailer(tmp_path)
    reader.poll_once()
    reader.poll_once()
    reader.stop()
    assert journal(tmp_path / "run") == [("loss", 0.5, 5)]
    assert reader.ignored_files == ["events.out.tfevents.3.notes"]
    assert capsys.readouterr().err.count("is not one: ignoring it") == 1


def test_a_restarted_reader_goes_on_where_it_left_off(tmp_path):
    path = tmp_path / "tb" / "events.out.tfevents.5.host"
    data = scalar_file([(step, step / 10) for step in range(6)], tag="acc")
    cut = len(scalar_file([(step, step / 10) for step in range(3)], tag="acc"))
    write(path, data[:cut])
    first = tailer(tmp_path, objective_tag="acc")
    assert first.poll_once() == 3
    first.stop()
    write(path, data[cut:])
    second = tailer(tmp_path, objective_tag="acc")
    assert second.poll_once() == 3
    second.stop()
    assert journal(tmp_path / "run") == [(None, step / 10, step) for step in range(6)]  # the objective: name None


def test_a_reader_killed_before_saving_its_position_is_not_repeated_by_its_successor(tmp_path):
    path = tmp_path / "tb" / "events.out.tfevents.12.host"
    write(path, scalar_file([(0, 1.0)]))
    first = tailer(tmp_path)
    assert first.poll_once() == 1
    saved = (tmp_path / "run" / "tensorboard.json").read_bytes()
    write(path, frame_record(event(1, simple_value("loss", 2.0))) + frame_record(event(2, simple_value("loss", 3.0))))
    assert first.poll_once() == 2
    first.release()  # killed here: the batch is journalled, the position saved before it is on disk
    (tmp_path / "run" / "tensorboard.json").write_bytes(saved)
    foreign = {"kind": "intermediate", "value": 4.0, "name": "loss", "step": 3, "ts": 1700000000.5, "rank": 0, "pid": 1, "key": "k-1"}
    write(tmp_path / "run" / "metrics.jsonl", (json.dumps(foreign) + "\n").encode())  # the same scalar from another process
    write(path, frame_record(event(3, simple_value("loss", 4.0))))
    second = tailer(tmp_path)
    assert second.poll_once() == 1 and second.duplicates_skipped == 2
    second.stop()
    assert [step for name, _, step in journal(tmp_path / "run")] == [0, 1, 2, 3, 3]  # 1 and 2 once; 3 is not the reader's


def test_one_reader_per_run_and_the_other_takes_over_when_it_stops(tmp_path):
    path = tmp_path / "tb" / "events.out.tfevents.6.host"
    write(path, scalar_file([(0, 1.0)]))
    wrapper_side, sidecar_side = tailer(tmp_path), tailer(tmp_path)
    assert wrapper_side.poll_once() == 1
    write(path, frame_record(event(1, simple_value("loss", 2.0))))
    assert sidecar_side.poll_once() == 0  # the lock is held: it reads nothing
    wrapper_side.stop()  # reads step 1 in its last pass, then lets the lock go
    write(path, frame_record(event(2, simple_value("loss", 3.0))))
    assert sidecar_side.poll_once() == 1
    sidecar_side.stop()
    assert journal(tmp_path / "run") == [("loss", 1.0, 0), ("loss", 2.0, 1), ("loss", 3.0, 2)]


def test_files_created_later_and_in_sub_directories_are_followed_by_the_thread(tmp_path):
    reader = tailer(tmp_path, poll_interval_s=0.02).start()
    try:
        write(tmp_path / "tb" / "events.out.tfevents.7.host", scalar_file([(0, 1.0)]))
        wait_until(lambda: len(journal(tmp_path / "run")) == 1, 10, what="the first file's scalar")
        write(tmp_path / "tb" / "train" / "deep" / "events.out.tfevents.8.host", scalar_file([(1, 2.0)], tag="train/loss"))
        wait_until(lambda: len(journal(tmp_path / "run")) == 2, 10, what="the scalar of a file in a sub-directory")
    finally:
        reader.stop()
    assert journal(tmp_path / "run") == [("loss", 1.0, 0), ("train/loss", 2.0, 1)]


def test_a_record_too_long_to_hold_a_scalar_is_skipped_unread(tmp_path):
    graph = frame_record(key(1, 1) + struct.pack("<d", 1.0) + ld(4, b"g" * (1 << 20) + b"raph"))  # a 1 MiB graph_def
    path = tmp_path / "tb" / "events.out.tfevents.11.host"
    write(path, scalar_file([(0, 1.0)]) + graph[: 1 << 19])
    reader = tailer(tmp_path)
    assert reader.poll_once() == 1
    write(path, graph[1 << 19:] + frame_record(event(1, simple_value("loss", 2.0))))
    assert reader.poll_once() == 1
    reader.stop()
    assert journal(tmp_path / "run") == [("loss", 1.0, 0), ("loss", 2.0, 1)] and reader.corrupt_records == 0


def test_wall_time_of_the_event_is_the_records_time(tmp_path):
    write(tmp_path / "tb" / "events.out.tfevents.9.host", frame_record(event(1, simple_value("x", 1.0), wall_time=1234567890.25)))
    reader = tailer(tmp_path)
    reader.poll_once()
    reader.stop()
    ((_, record),) = [(o, r) for o, r in iter_records(str(tmp_path / "run"))]
    assert record.ts == 1234567890.25 and record.step == 1


# --- end to end: real writers while the wrapper runs, a restart, the sidecar ---------------------------

WRITER_SCRIPT = """
    import json, os, sys, time
    from {module} import SummaryWriter

    run_dir = os.environ["ANYLEARN_REPORTER_RUN_DIR"]
    first = int(sys.argv[1])

    def journalled():
        try:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f if '"name":"loss"' in line]
            return sum(first <= r["step"] < first + 3 for r in records)
        except FileNotFoundError:
            return 0

    # tensorboardX's flush() leaves queued events to its writer thread, which writes every flush_secs
    writer = SummaryWriter(os.path.join("output", "tb", "run-%d" % first), flush_secs=1)
    for step in range(first, first + 3):
        writer.add_scalar("acc", step / 10, step)
        writer.add_scalar("loss", 1.0 - step / 10, step)
        writer.flush()
    deadline = time.monotonic() + 20  # the wrapper reads while we run: wait until it has journalled them
    while journalled() < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    print("read while running:", journalled() == 3)
    later = SummaryWriter(os.path.join("output", "tb", "run-%d" % first, "later"))
    later.add_scalar("acc", (first + 3) / 10, first + 3)
    later.close()
    writer.close()
"""


@pytest.mark.parametrize("module", ["torch.utils.tensorboard", "tensorboardX"])
def test_a_real_writer_under_the_wrapper_reports_every_scalar_once_in_order_across_a_restart(server, tmp_path, module):
    pytest.importorskip(module.split(".")[0], reason=f"{module} is not installed")
    if module.startswith("torch"):
        pytest.importorskip("tensorboard", reason="torch's SummaryWriter needs the tensorboard package")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(WRITER_SCRIPT.format(module=module)))
    env = task_env(server.base_url, str(tmp_path / "run"))
    runs = (0, 4) if module.startswith("torch") else (0,)  # a second wrapper on the same task: a restart
    for first in runs:
        done = cli("run", "--tensorboard-dir", "tb", "--tensorboard-tag", "acc", "--", sys.executable, str(script), str(first),
                   env=env, cwd=tmp_path, timeout_s=60)
        assert done.returncode == 0, done.stderr
        assert "read while running: True" in done.stdout
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [step / 10 for step in range(4 * len(runs))]  # each once, in order
    losses = [(value, step) for name, value, step in journal(tmp_path / "run") if name == "loss"]
    assert losses == [(round(1.0 - step / 10, 6), step) for first in runs for step in range(first, first + 3)]


def test_the_sidecar_reads_the_event_files_until_the_run_ends(server, tmp_path):
    run_dir = tmp_path / "run"
    env = task_env(server.base_url, str(run_dir), ANYLEARN_TENSORBOARD_DIR=str(tmp_path / "tb"), ANYLEARN_TENSORBOARD_TAG="acc")
    path = tmp_path / "tb" / "events.out.tfevents.10.host"
    data = scalar_file([(step, step / 4) for step in range(4)], tag="acc")
    write(path, data[:-7])  # the last record is cut short for now
    with running_sidecar(env, tmp_path) as sidecar:
        wait_until(lambda: len(server.backend.tasks()) == 1 and len(server.backend.tasks()[0]["intermediate_metrics"]) == 3,
                   20, what="three scalars delivered by the sidecar")
        write(path, data[-7:])
        (run_dir / "summary.json").write_text("{}")
        assert sidecar.wait(30) == 0
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [0.0, 0.25, 0.5, 0.75]


def test_a_wrapper_and_a_sidecar_on_one_run_never_both_read_the_files(server, tmp_path):
    run_dir = tmp_path / "run"
    data = scalar_file([(step, step / 8) for step in range(8)], tag="acc")
    (tmp_path / "events.bin").write_bytes(data)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import os, time
        data = open("events.bin", "rb").read()
        os.makedirs("output/tb", exist_ok=True)
        with open("output/tb/events.out.tfevents.13.host", "ab") as f:
            for start in range(0, len(data), 97):  # pieces that cut records anywhere
                f.write(data[start:start + 97])
                f.flush()
                time.sleep(0.01)
    """))
    sidecar_env = task_env(server.base_url, str(run_dir), ANYLEARN_TENSORBOARD_DIR="tb", ANYLEARN_TENSORBOARD_TAG="acc")
    with running_sidecar(sidecar_env, tmp_path) as sidecar:
        wait_until(lambda: (run_dir / "deliver.lock").exists(), 20, what="the sidecar's start")
        # the training container: the same run directory, no key (offline: it journals, the sidecar delivers)
        wrapper_env = task_env("", str(run_dir), ANYLEARN_SECRET_KEY="", ANYLEARN_BACKEND_URL="")
        done = cli("run", "--tensorboard-dir", "tb", "--tensorboard-tag", "acc", "--", sys.executable, str(script),
                   env=wrapper_env, cwd=tmp_path, timeout_s=60)
        assert done.returncode == 0, done.stderr
        assert sidecar.wait(30) == 0
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [step / 8 for step in range(8)]  # each once, whoever read it
    assert [step for _, _, step in journal(run_dir)] == list(range(8))

