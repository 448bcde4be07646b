"""The W&B bridge: an unchanged W&B script under `run --autolog` reports to AnyLearn, runs offline when no
W&B account is configured (said once), and W&B's own run file holds what it held without us."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Dict, List

import pytest

pytest.importorskip("wandb", reason="wandb is not installed (pip install 'anylearn-reporter[wandb]')")

from conftest import clean_environ, run_python  # noqa: E402
from integrations_support import named, offline_tracker_env, run_autolog  # noqa: E402

SCRIPT = """
    import os, wandb
    run = wandb.init(project="demo", config={"lr": 0.1})
    for step in range(3):
        wandb.log({"loss": 1.0 / (step + 1), "eval": {"acc": 0.5 + 0.1 * step}, "note": "text"})
    run.log({"lr": 0.01}, commit=False)
    run.log({"loss": 0.1})
    try:
        run.log({1: 2.0})  # W&B refuses non-string keys: it raises, as it would have
    except TypeError as exc:
        print("RAISED", exc)
    print("MODE", run.settings.mode, os.environ.get("WANDB_MODE"))
    run.finish()
"""


def wandb_history(path: str) -> List[Dict[str, Any]]:
    """The history rows of a ``.wandb`` run file (LevelDB log framing of W&B ``Record`` protobufs)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    block, position, part, rows = 32768, 7, b"", []  # after W&B's 7-byte file header
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        part += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_an_unchanged_wandb_script_reports_offline_by_key_and_step_and_wandb_keeps_its_run_file(server, tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)  # no account, no mode: the bridge makes W&B run offline
    env = {**offline_tracker_env(tmp_path), "ANYLEARN_OBJECTIVE_METRIC": "eval/acc"}
    done, rows, task = run_autolog(SCRIPT, server, tmp_path, **env)
    assert "MODE offline offline" in done.stdout and "RAISED" in done.stdout, done.stdout + done.stderr
    assert done.stderr.count("W&B runs offline") == 1

    expected = []
    for step in range(3):
        expected += [("loss", step, pytest.approx(1.0 / (step + 1))), (None, step, pytest.approx(0.5 + 0.1 * step))]
    assert named(rows) == expected + [("lr", 3, 0.01), ("loss", 3, 0.1)]  # the refused call journalled nothing
    assert task["intermediate_metrics"] == pytest.approx([0.5, 0.6, 0.7]) and task["final_metric"] == pytest.approx(0.7)
    assert [kind for kind, *_ in rows].count("final") == 1  # at run.finish(), once

    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)
    assert [row["_step"] for row in history] == [0, 1, 2, 3]
    from_wandb = [(key, row["_step"], value) for row in history for key, value in row.items()
                  if not key.startswith("_") and isinstance(value, (int, float))]
    ours = [(name or "eval/acc", step, value) for name, step, value in named(rows)]
    assert sorted(from_wandb) == sorted(ours)
    assert all(row["note"] == "text" for row in history[:3])  # what we skip, W&B keeps


@pytest.mark.parametrize(("given", "mode"), [
    ({"WANDB_MODE": "online"}, "online"),  # the user's choice stays
    ({"WANDB_API_KEY": "k" * 40}, None),  # an account: W&B decides, as without us
    ({"ANYLEARN_AUTOLOG": ""}, None),  # reporter.autolog() called by the script: W&B's mode untouched
])
def test_wandb_is_made_offline_only_under_run_autolog_without_an_account_or_a_mode(given, mode, tmp_path):
    env = {k: v for k, v in clean_environ(**offline_tracker_env(tmp_path)).items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update({"ANYLEARN_AUTOLOG": "1", **given})
    code = "import os, reporter; reporter.autolog(); import wandb; print('MODE', os.environ.get('WANDB_MODE'))"
    done = run_python(code, env)
    assert done.returncode == 0 and f"MODE {mode}" in done.stdout, done.stderr
    assert "W&B runs offline" not in done.stderr


@pytest.mark.parametrize(("netrc", "base_url", "settings", "mode"), [
    ("machine api.wandb.ai login user password " + "k" * 40, None, "", None),  # `wandb login`: W&B decides
    ("machine 127.0.0.1:9 login user password " + "k" * 40, "http://127.0.0.1:9", "", None),  # its own server
    ("machine example.org login user password secret", None, "", "offline"),  # no entry for W&B's host
    ("", None, "[default]\napi_key = " + "k" * 40 + "\n", None),  # a settings file's key
    ("", None, "[default]\nbase_url = https://api.wandb.ai\n", "offline"),  # settings without a key
])
def test_a_user_logged_in_to_wandb_is_not_made_offline(netrc, base_url, settings, mode, tmp_path):
    env = {k: v for k, v in clean_environ(**offline_tracker_env(tmp_path)).items()
           if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL")}
    (tmp_path / "netrc").write_text(netrc + "\n")
    (tmp_path / "netrc").chmod(0o600)
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text(settings)
    env.update({"ANYLEARN_AUTOLOG": "1", "NETRC": str(tmp_path / "netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")})
    if base_url:
        env["WANDB_BASE_URL"] = base_url
    code = "import os, reporter; reporter.autolog(); import wandb; print('MODE', os.environ.get('WANDB_MODE'))"
    done = run_python(code, env, cwd=str(tmp_path))
    assert done.returncode == 0 and f"MODE {mode}" in done.stdout, done.stdout + done.stderr
    assert ("W&B runs offline" in done.stderr) == (mode == "offline")
    assert "k" * 40 not in done.stdout + done.stderr and "secret" not in done.stdout + done.stderr
