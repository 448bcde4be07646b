"""The log and the drain progress (``log.Progress``): a bar on a terminal, plain lines otherwise."""





def test_sync_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from reporter.log import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = Progress("/runs/offline-x", 10, terminal)
    bar.update(5)
    bar.finish()
    assert terminal.getvalue() == "\roffline-x [###############...............] 5/10\n"
    plain = io.StringIO()
    lines = Progress("/runs/offline-x", 10, plain)
    lines.update(5)
    lines.update(6)  # a plain line only every 5 s of a long delivery
    lines.update(12, force=True)  # and the last one; records journalled meanwhile do not count
    assert plain.getvalue() == "/runs/offline-x: 10/10 records delivered\n"


def test_counts_by_reason_read_as_one_phrase():
    from reporter.log import counted

    assert counted({"torn or invalid line": 1, "not the objective metric": 2}, "skipped") == (
        "3 skipped (2 not the objective metric, 1 torn or invalid line)")
    assert counted({"EFBIG": 4}) == "4 (4 EFBIG)"


def test_sync_hint_is_the_complete_command_never_the_key():
    from reporter.log import sync_hint

    offline = sync_hint("/runs/offline-20261125-101500-abc123", env={})
    assert offline == ("ANYLEARN_SECRET_KEY='<the task's secret key>' anylearn-reporter sync "
                       "/runs/offline-20261125-101500-abc123 --task-id '<the task id>'")
    with_key = sync_hint("/runs/TRAIx", "http://127.0.0.1:8080/api", env={"ANYLEARN_SECRET_KEY": "s3cret"})
    assert with_key == "anylearn-reporter sync /runs/TRAIx --backend-url http://127.0.0.1:8080/api"
    refused = sync_hint("/runs/TRAIx", env={"ANYLEARN_SECRET_KEY": "s3cret"}, new_key=True)
    assert refused.startswith("ANYLEARN_SECRET_KEY='<the task's secret key>' ") and "s3cret" not in refused


def test_one_record_is_singular(capsys):
    from reporter.log import warn_pending

    warn_pending(1, "/runs/TRAIx")
    assert "1 record stays pending in /runs/TRAIx; deliver it with" in capsys.readouterr().err


def test_say_once_says_each_key_once_and_its_memory_is_bounded(capsys, monkeypatch):
    from reporter import log

    monkeypatch.setattr(log, "MAX_SAID_KEYS", 3)
    assert log.say_once(("cursor", 7), "the cursor %s is stale", "c") is True
    assert log.say_once(("cursor", 7), "the cursor %s is stale", "c") is False
    assert capsys.readouterr().err == "anylearn-reporter: the cursor c is stale\n"
    for key in range(3):  # past the bound the memory starts afresh: it never grows past MAX_SAID_KEYS
        log.say_once(key, "key %d", key)
    assert log.say_once(("cursor", 7), "again") is True
    assert log.say_once(0, "key %d", 0) is True  # forgotten with the rest when the memory started afresh
