"""Settings: defaults under $FLYWHEEL_HOME, a YAML file, FLYWHEEL_* overrides, typed errors, secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from flywheel.config import Settings, load_settings
from flywheel.errors import ConfigError

SECRET = "s3cr3t-value-that-must-not-leak"


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_are_rooted_at_flywheel_home(flywheel_home: Settings, tmp_path: Path) -> None:
    home = (tmp_path / "flywheel-home").resolve()
    assert flywheel_home.home == home
    assert flywheel_home.storage.root == str(home / "store")
    assert flywheel_home.features.dir == str(home / "feast")
    for path in (flywheel_home.home, flywheel_home.storage.root, flywheel_home.features.dir):
        assert Path(path).is_absolute()
    assert flywheel_home.training.epochs == 20  # an embedded default
    assert flywheel_home.storage.access_key is None and flywheel_home.storage.secret_key is None


def test_relative_home_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={"FLYWHEEL_HOME": "rel/home"})
    assert settings.home == (tmp_path / "rel" / "home").resolve()
    assert Path(settings.storage.root).is_absolute()


def test_default_home_is_dot_flywheel_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    assert settings.home == (tmp_path / ".flywheel").resolve()


def test_explicit_values_are_not_replaced_by_home_defaults(tmp_path: Path) -> None:
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_STORAGE__ROOT": "s3://bucket/prefix"})
    assert settings.storage.root == "s3://bucket/prefix"


# --- the YAML file ----------------------------------------------------------------------------


def test_yaml_by_explicit_path(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "conf" / "custom.yaml", "training:\n  epochs: 9\nmodel_name: churn\n")
    settings = load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path / "home")})
    assert settings.training.epochs == 9
    assert settings.model_name == "churn"
    assert settings.training.batch_size == 256  # untouched fields keep their defaults


def test_yaml_named_by_flywheel_config(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "named.yaml", "gate:\n  min_roc_auc: 0.9\n")
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_CONFIG": str(config)})
    assert settings.gate.min_roc_auc == 0.9


def test_yaml_found_in_flywheel_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_yaml(home / "flywheel.yaml", "serving:\n  port: 9090\n")
    settings = load_settings(env={"FLYWHEEL_HOME": str(home)})
    assert settings.serving.port == 9090


def test_explicit_path_wins_over_flywheel_config_and_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_yaml(home / "flywheel.yaml", "training:\n  epochs: 1\n")
    named = write_yaml(tmp_path / "named.yaml", "training:\n  epochs: 2\n")
    explicit = write_yaml(tmp_path / "explicit.yaml", "training:\n  epochs: 3\n")
    env = {"FLYWHEEL_HOME": str(home), "FLYWHEEL_CONFIG": str(named)}
    assert load_settings(explicit, env=env).training.epochs == 3
    assert load_settings(env=env).training.epochs == 2


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "empty.yaml", "")
    assert load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path)}).training.epochs == 20


# --- environment variables --------------------------------------------------------------------


def test_env_overrides_yaml(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "f.yaml", "training:\n  epochs: 10\n  batch_size: 64\n")
    env = {"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAINING__EPOCHS": "3"}
    settings = load_settings(config, env=env)
    assert settings.training.epochs == 3
    assert settings.training.batch_size == 64  # the rest of the YAML section survives the merge


def test_env_values_are_typed(tmp_path: Path) -> None:
    env = {
        "FLYWHEEL_HOME": str(tmp_path),
        "FLYWHEEL_STORAGE__S3_SECURE": "false",
        "FLYWHEEL_TRAINING__LEARNING_RATE": "0.01",
        "FLYWHEEL_TRAINING__HIDDEN": "[16, 8]",
        "FLYWHEEL_STORAGE__S3_ENDPOINT": "127.0.0.1:9000",
    }
    settings = load_settings(env=env)
    assert settings.storage.s3_secure is False
    assert settings.training.learning_rate == 0.01
    assert settings.training.hidden == [16, 8]
    assert settings.storage.s3_endpoint == "127.0.0.1:9000"


@pytest.mark.parametrize(
    ("name", "raw", "read"),
    [
        ("FLYWHEEL_FEATURES__PROJECT", "no", lambda s: s.features.project),  # YAML would say False
        ("FLYWHEEL_STORAGE__S3_REGION", "1:30", lambda s: s.storage.s3_region),  # YAML 1.1: 90
        ("FLYWHEEL_MODEL_NAME", "0123", lambda s: s.model_name),  # YAML: the number 123
        ("FLYWHEEL_FEATURES__REDIS_CONNECTION", "null", lambda s: s.features.redis_connection),
    ],
)
def test_env_text_fields_stay_verbatim(tmp_path: Path, name: str, raw: str, read) -> None:
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), name: raw})
    assert read(settings) == raw


@pytest.mark.parametrize(
    ("raw", "endpoint", "secure"),
    [
        ("127.0.0.1:9000", "127.0.0.1:9000", True),
        ("http://minio.kubeflow:9000", "minio.kubeflow:9000", False),
        ("https://s3.example.com/", "s3.example.com", True),
    ],
)
def test_s3_endpoint_url_becomes_host_port_and_secure(tmp_path: Path, raw: str, endpoint: str, secure: bool) -> None:
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_STORAGE__S3_ENDPOINT": raw})
    assert (settings.storage.s3_endpoint, settings.storage.s3_secure) == (endpoint, secure)


def test_s3_endpoint_with_another_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage\.s3_endpoint"):
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_STORAGE__S3_ENDPOINT": "ftp://host:21"})


def test_non_settings_flywheel_variables_are_ignored(tmp_path: Path) -> None:
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_CODE_VERSION": "abc123"})
    assert settings.home == tmp_path.resolve()


# --- errors -----------------------------------------------------------------------------------


def test_invalid_value_from_env_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"training\.epochs"):
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAINING__EPOCHS": "-1"})


def test_invalid_value_from_yaml_names_the_field_and_the_file(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "bad.yaml", "training:\n  epochs: -1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path)})
    assert "training.epochs" in str(info.value)
    assert str(config) in str(info.value)


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"serving\.port"):
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_SERVING__PORT": "eighty"})


def test_unknown_key_in_yaml_is_refused(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "typo.yaml", "trainin:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="trainin"):
        load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path)})


def test_unknown_nested_key_is_refused(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "typo.yaml", "training:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"training\.epoch"):
        load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path)})


def test_unknown_env_variable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainin"):
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAININ__EPOCHS": "3"})


def test_error_for_a_home_yaml_names_that_file(tmp_path: Path) -> None:
    write_yaml(tmp_path / "flywheel.yaml", "training:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path)})
    assert str(tmp_path / "flywheel.yaml") in str(info.value)


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "broken.yaml", "training: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path)})


def test_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path)})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", env={"FLYWHEEL_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_CONFIG": str(tmp_path / "nope.yaml")})


def test_a_folder_as_settings_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path, env={"FLYWHEEL_HOME": str(tmp_path)})


# --- secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["access_key", "secret_key"])
def test_credentials_in_yaml_are_refused(tmp_path: Path, field: str) -> None:
    config = write_yaml(tmp_path / "creds.yaml", f"storage:\n  {field}: {SECRET}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path)})
    assert "FLYWHEEL_S3_ACCESS_KEY" in str(info.value)
    assert SECRET not in str(info.value)


def test_secrets_from_env_are_secret_and_never_dumped(tmp_path: Path) -> None:
    env = {
        "FLYWHEEL_HOME": str(tmp_path),
        "FLYWHEEL_S3_ACCESS_KEY": "AKIA-" + SECRET,
        "FLYWHEEL_S3_SECRET_KEY": SECRET,
    }
    settings = load_settings(env=env)
    assert isinstance(settings.storage.access_key, SecretStr)
    assert isinstance(settings.storage.secret_key, SecretStr)
    assert settings.storage.access_key.get_secret_value() == "AKIA-" + SECRET
    assert settings.storage.secret_key.get_secret_value() == SECRET

    dumped = settings.model_dump()
    assert "access_key" not in dumped["storage"] and "secret_key" not in dumped["storage"]
    as_json = settings.model_dump_json()
    assert SECRET not in as_json
    assert "access_key" not in json.loads(as_json)["storage"]
    assert SECRET not in repr(settings) and SECRET not in str(settings)


def test_aws_variables_are_a_fallback_for_credentials(tmp_path: Path) -> None:
    env = {"FLYWHEEL_HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "aws-id", "AWS_SECRET_ACCESS_KEY": "aws-secret"}
    settings = load_settings(env=env)
    assert settings.storage.access_key.get_secret_value() == "aws-id"
    assert settings.storage.secret_key.get_secret_value() == "aws-secret"
    env["FLYWHEEL_S3_ACCESS_KEY"] = "flywheel-id"
    assert load_settings(env=env).storage.access_key.get_secret_value() == "flywheel-id"


def test_secrets_from_env_combine_with_a_yaml_storage_section(tmp_path: Path) -> None:
    # `storage:` with nothing under it is None in YAML; the secret must still land there.
    config = write_yaml(tmp_path / "f.yaml", "storage:\n")
    settings = load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_S3_SECRET_KEY": SECRET})
    assert settings.storage.secret_key.get_secret_value() == SECRET
    config = write_yaml(tmp_path / "g.yaml", "storage:\n  s3_endpoint: 127.0.0.1:9000\n")
    settings = load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_S3_SECRET_KEY": SECRET})
    assert settings.storage.s3_endpoint == "127.0.0.1:9000"
    assert settings.storage.secret_key.get_secret_value() == SECRET


# --- every knob is a setting --------------------------------------------------------------------


def test_every_flywheel_variable_the_code_reads_is_a_setting() -> None:
    """A FLYWHEEL_* variable read outside the settings object (FLYWHEEL_DDP_BACKEND was) made every
    command fail with "Extra inputs are not permitted": each name in the code must map to a field."""
    import re

    from flywheel.config import KFP_TOKEN_ENV, NOT_SETTINGS_ENV, SECRET_ENV

    root = Path(__file__).resolve().parents[2]
    secrets = {name for names in SECRET_ENV.values() for name in names} | {KFP_TOKEN_ENV}
    names = set()
    for folder in ("flywheel", "serving", "components", "pipelines"):
        for path in (root / folder).rglob("*.py"):
            names |= set(re.findall(r"FLYWHEEL_[A-Z0-9_]+", path.read_text()))
    names -= {"FLYWHEEL_A__B"}  # the docstring's example of the naming rule
    assert "FLYWHEEL_HOME" in names
    for name in sorted(names - NOT_SETTINGS_ENV - secrets):
        model: object = Settings
        for part in name[len("FLYWHEEL_"):].lower().split("__"):
            assert part in model.model_fields, f"{name} is read by the code but is no settings field"  # type: ignore[attr-defined]
            model = model.model_fields[part].annotation  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["auto", "gloo", "nccl"])
def test_the_ddp_backend_is_a_training_setting(tmp_path: Path, backend: str) -> None:
    from flywheel.training.launcher import torchrun_command

    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAINING__BACKEND": backend})
    command = torchrun_command(settings, tmp_path / "d", tmp_path / "s", tmp_path / "o", tmp_path / "l")
    assert command[command.index("--backend") + 1] == backend


def test_an_unknown_backend_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="training.backend"):
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAINING__BACKEND": "mpi"})


def test_an_unknown_variable_is_named_with_the_valid_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAINING__EPOCS": "3"})
    message = str(info.value)
    assert "training.epocs is not a setting (from FLYWHEEL_TRAINING__EPOCS" in message
    assert "valid here:" in message and "epochs" in message


def test_the_kfp_token_comes_from_the_environment_only(tmp_path: Path) -> None:
    """A bearer token in a settings file would end up in git and in `settings.yaml` copies."""
    from flywheel.config import write_settings

    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_KFP_TOKEN": "tok-secret-1"})
    assert settings.kfp.token is not None and settings.kfp.token.get_secret_value() == "tok-secret-1"
    assert "tok-secret-1" not in write_settings(settings, tmp_path / "written.yaml").read_text()
    config = tmp_path / "flywheel.yaml"
    config.write_text("kfp:\n  token: tok-secret-2\n")
    with pytest.raises(ConfigError, match="FLYWHEEL_KFP_TOKEN") as err:
        load_settings(config, env={"FLYWHEEL_HOME": str(tmp_path)})
    assert "tok-secret-2" not in str(err.value)


def test_one_steps_resources_can_be_changed_without_losing_the_other_defaults(tmp_path: Path) -> None:
    defaults = load_settings(env={"FLYWHEEL_HOME": str(tmp_path)}).kfp.resources
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_KFP__RESOURCES__TRAIN__CPU_LIMIT": "6"})
    assert settings.kfp.resources["train"].cpu_limit == "6"
    assert settings.kfp.resources["train"].memory_limit == defaults["train"].memory_limit
    assert settings.kfp.resources["features"] == defaults["features"]
    with pytest.raises(ConfigError, match="'trian' is not a pipeline step"):
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_KFP__RESOURCES__TRIAN__CPU_LIMIT": "6"})


@pytest.mark.parametrize("name, value, problem", [
    ("FLYWHEEL_KFP__HOST", "ml-pipeline-ui:80", "http://"),
    ("FLYWHEEL_KFP__SCHEDULE_CRON", "0 2 * * *", "six fields"),
])
def test_bad_kfp_settings_are_named(tmp_path: Path, name: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(env={"FLYWHEEL_HOME": str(tmp_path), name: value})


def test_the_label_delay_is_the_use_cases_not_a_setting():
    """It moved into the use case's contract (label_known): the old variable is refused by name
    rather than silently ignored."""
    with pytest.raises(ConfigError, match="features.label_delay is not a setting"):
        load_settings(env={"FLYWHEEL_FEATURES__LABEL_DELAY": "P5D"})
