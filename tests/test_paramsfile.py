"""params.json: the command's hyper-parameters, with the key and the token masked in every form."""

import json
import sys
from urllib.parse import quote

from conftest import TASK_ID, clean_environ, cli

from reporter.config import Secret
from reporter.transport import secret_forms
from reporter.paramsfile import masked, secret_forms_of

KEY = 'sécr"et\\k3y/1'  # characters JSON escapes: a text replacement in the JSON would miss it
TOKEN = "t0ken-of-the-user"


def test_the_wrapper_masks_the_key_and_the_token_in_every_form_in_params_json(tmp_path):
    params = {
        "lr": 0.01,
        "key": KEY,
        "token": TOKEN,
        "url": f"https://example.invalid/data?sig={quote(KEY, safe='')}&t={TOKEN}",
        "nested": {"args": ["--key", KEY, json.dumps({"k": KEY})]},
        KEY: "a key named by the secret",
    }
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path), ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_SECRET_KEY=KEY,
                        ANYLEARN_AUTH_TOKEN=TOKEN, ANYLEARN_BACKEND_URL="http://127.0.0.1:9/api",
                        ANYLEARN_DRAIN_TIMEOUT="0", ANYLEARN_TRAIN_PARAMS=json.dumps(params))
    result = cli("run", "--", sys.executable, "-c", "pass", env=env)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / TASK_ID / "params.json").read_text(encoding="utf-8")
    for form in secret_forms(KEY) + secret_forms(TOKEN):
        assert form not in text
    assert json.loads(text) == {
        "lr": 0.01,
        "key": "***",
        "token": "***",
        "url": "https://example.invalid/data?sig=***&t=***",
        "nested": {"args": ["--key", "***", '{"k": "***"}']},
        "***": "a key named by the secret",
    }


def test_masking_keeps_what_holds_no_secret_and_masks_a_number_that_is_one():
    forms = secret_forms_of(Secret("31415926"), None)
    assert masked({"a": [1, 2.5, True, None, "x"], "pi": 31415926, "n": 7}, forms) == {
        "a": [1, 2.5, True, None, "x"], "pi": "***", "n": 7,
    }
