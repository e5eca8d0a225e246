"""The local release's servers get exactly the caller's settings: none of this process's FLYWHEEL_*
variables (which would override the settings file), but the S3 credentials, which no file holds."""

from __future__ import annotations

from flywheel.config import load_settings, write_settings
from flywheel.deploy.local import server_env


def test_servers_get_the_callers_settings_and_credentials_only(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_HOME", "/somewhere/else")  # would override the settings file's home
    monkeypatch.setenv("FLYWHEEL_SERVING__PORT", "9999")
    monkeypatch.setenv("FLYWHEEL_CONFIG", "/another/settings.yaml")
    monkeypatch.setenv("PATH_FOR_THE_TEST", "kept")
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_S3_ACCESS_KEY": "key-id",
                                  "FLYWHEEL_S3_SECRET_KEY": "key-secret"})
    env = server_env(settings)
    assert {k for k in env if k.startswith("FLYWHEEL_")} == {"FLYWHEEL_S3_ACCESS_KEY", "FLYWHEEL_S3_SECRET_KEY"}
    assert (env["FLYWHEEL_S3_ACCESS_KEY"], env["FLYWHEEL_S3_SECRET_KEY"]) == ("key-id", "key-secret")
    assert env["PATH_FOR_THE_TEST"] == "kept"
    written = write_settings(settings, tmp_path / "settings.yaml").read_text()
    assert "key-secret" not in written and str(tmp_path) in written  # the file carries the settings, never the keys
