"""Keys given as config fields (not only inside URLs) are redacted wherever a config is
written: the build description (manifest, build.json) and Prefect's flow-run parameters."""

from __future__ import annotations

import json

from flows.build_okedit import build_okedit
from pipeline.config import BuildConfig
from pipeline.llm import redact_secrets

SECRET = "sk-field-secret-123"


def config() -> BuildConfig:
    return BuildConfig(
        source={"name": "okvqa-hub"},
        annotator={
            "kind": "llm",
            "llm_base_url": "https://user:sk-url-secret@llm.example/v1",
            "llm": {"api_key": SECRET},
        },
    )


def test_a_key_field_is_redacted_in_the_description_and_the_parameters() -> None:
    cfg = config()
    assert SECRET in cfg.model_dump_json()  # the running build needs it ...
    written = json.dumps(cfg.describe()) + json.dumps(redact_secrets(cfg.model_dump(mode="json")))
    assert SECRET not in written and "sk-url-secret" not in written  # ... nothing written has it
    parameters = build_okedit.serialize_parameters({"config": cfg})
    assert SECRET not in json.dumps(parameters, default=str)
