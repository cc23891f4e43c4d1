import shutil
from pathlib import Path

import platformdirs
import pydantic
import pytest
import yaml

from taskorch import config as config_module
from taskorch.config import Config, ConfigError, default_db_path, load_config
from taskorch.resources import resource_dir

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config"


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def leaf_paths(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= leaf_paths(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


@pytest.fixture
def config_dir(tmp_path, monkeypatch) -> Path:
    """A private config dir holding a copy of default.yaml, so env files never land in the repo."""
    directory = tmp_path / "configdir"
    directory.mkdir()
    shutil.copy(REPO_CONFIG / "default.yaml", directory / "default.yaml")
    monkeypatch.setattr(config_module, "resource_dir", lambda name: directory)
    return directory


def test_packaged_defaults_load_and_equal_the_model_defaults():
    assert load_config(environ={}) == Config()
    raw = yaml.safe_load((REPO_CONFIG / "default.yaml").read_text(encoding="utf-8"))
    assert Config.model_validate(raw) == Config()


def test_default_yaml_lists_every_model_key_each_with_a_comment():
    text = (REPO_CONFIG / "default.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    model_keys = leaf_paths(Config().model_dump(mode="json"))
    assert leaf_paths(raw) == model_keys
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"undocumented key line: {line!r}"


def test_user_file_overrides_defaults_and_keeps_the_rest(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", {"tasks": {"lease_seconds": 60}, "server": {"port": 9000}})
    cfg = load_config(user, environ={})
    assert cfg.tasks.lease_seconds == 60
    assert cfg.server.port == 9000
    assert cfg.tasks.max_attempts == 3
    assert cfg.server.host == "127.0.0.1"


def test_taskorch_config_variable_selects_the_user_file_when_no_file_is_passed(tmp_path):
    from_env = write_yaml(tmp_path / "env.yaml", {"tasks": {"lease_seconds": 11}})
    explicit = write_yaml(tmp_path / "explicit.yaml", {"tasks": {"lease_seconds": 22}})
    assert load_config(environ={"TASKORCH_CONFIG": str(from_env)}).tasks.lease_seconds == 11
    assert load_config(explicit, environ={"TASKORCH_CONFIG": str(from_env)}).tasks.lease_seconds == 22


def test_missing_user_file_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"not found: .*nope\.yaml \[from TASKORCH_CONFIG\]"):
        load_config(environ={"TASKORCH_CONFIG": str(tmp_path / "nope.yaml")})


def test_empty_user_file_changes_nothing(tmp_path):
    assert load_config(write_yaml(tmp_path / "empty.yaml", ""), environ={}) == Config()


def test_taskorch_env_layers_the_named_file_between_defaults_and_user_file(tmp_path, config_dir):
    write_yaml(config_dir / "dev.yaml", {"tasks": {"lease_seconds": 30, "max_attempts": 7}})
    user = write_yaml(tmp_path / "user.yaml", {"tasks": {"lease_seconds": 40}})
    cfg = load_config(user, environ={"TASKORCH_ENV": "dev"})
    assert cfg.tasks.max_attempts == 7
    assert cfg.tasks.lease_seconds == 40


def test_missing_file_for_taskorch_env_is_a_config_error(config_dir):
    with pytest.raises(ConfigError, match=r"prod\.yaml \[from TASKORCH_ENV\]"):
        load_config(environ={"TASKORCH_ENV": "prod"})


def test_taskorch_env_must_be_a_plain_name_not_a_path(config_dir):
    with pytest.raises(ConfigError, match="TASKORCH_ENV"):
        load_config(environ={"TASKORCH_ENV": "../etc/secrets"})


def test_env_var_overrides_a_nested_key_converting_it_to_int(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", {"tasks": {"lease_seconds": 60}})
    cfg = load_config(
        user, environ={"TASKORCH_TASKS__LEASE_SECONDS": "90", "TASKORCH_SERVER__RATE_LIMIT__BURST": " 5 "}
    )
    assert cfg.tasks.lease_seconds == 90
    assert cfg.server.rate_limit.burst == 5


def test_env_vars_convert_floats_bools_enums_and_null():
    cfg = load_config(
        environ={
            "TASKORCH_TASKS__POLL_INTERVAL_SECONDS": "0.25",
            "TASKORCH_STORE__INLINE_WRITES": "no",
            "TASKORCH_STORE__DURABILITY": "normal",
            "TASKORCH_LOGGING__LEVEL": "debug",
            "TASKORCH_LLM__MODEL": "null",
            "TASKORCH_LLM__API_BASE": "",
        }
    )
    assert cfg.tasks.poll_interval_seconds == 0.25
    assert cfg.store.inline_writes is False
    assert cfg.store.durability == "normal"
    assert cfg.logging.level == "DEBUG"
    assert cfg.llm.model is None and cfg.llm.api_base is None


def test_env_lists_are_comma_separated_and_an_empty_string_is_an_empty_list(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", {"server": {"allowed_hosts": ["a.example"]}})
    cfg = load_config(
        user,
        environ={
            "TASKORCH_SERVER__CORS_ORIGINS": "https://a.example, https://b.example",
            "TASKORCH_SERVER__ALLOWED_HOSTS": "",
        },
    )
    assert cfg.server.cors_origins == ("https://a.example", "https://b.example")
    assert cfg.server.allowed_hosts == ()


def test_taskorch_db_and_taskorch_api_keys_shortcuts(tmp_path):
    cfg = load_config(environ={"TASKORCH_DB": str(tmp_path / "q.db"), "TASKORCH_API_KEYS": "k1,k2"})
    assert cfg.store.path == tmp_path / "q.db"
    assert cfg.db_path() == tmp_path / "q.db"
    assert cfg.server.api_key_values() == ("k1", "k2")


def test_shortcut_and_full_variable_that_disagree_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="TASKORCH_DB and TASKORCH_STORE__PATH"):
        load_config(environ={"TASKORCH_DB": "/a.db", "TASKORCH_STORE__PATH": "/b.db"})


def test_env_vars_beat_the_user_file_and_overrides_beat_env_vars(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", {"store": {"path": "/from-file.db"}, "server": {"port": 1}})
    cfg = load_config(
        user,
        overrides={"store": {"path": "/from-flag.db"}},
        environ={"TASKORCH_DB": "/from-env.db", "TASKORCH_SERVER__PORT": "2"},
    )
    assert cfg.store.path == Path("/from-flag.db")
    assert cfg.server.port == 2


def test_none_in_overrides_means_the_flag_was_not_given():
    cfg = load_config(
        overrides={"store": {"path": None}, "server": {"port": None}}, environ={"TASKORCH_DB": "/from-env.db"}
    )
    assert cfg.store.path == Path("/from-env.db")
    assert cfg.server.port == 8080


def test_overrides_dict_is_not_mutated():
    overrides = {"tasks": {"lease_seconds": 5}}
    load_config(overrides=overrides, environ={"TASKORCH_TASKS__MAX_ATTEMPTS": "2"})
    assert overrides == {"tasks": {"lease_seconds": 5}}


def test_unknown_key_in_yaml_is_an_error_naming_the_key_path_and_file(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", {"tasks": {"lease_secondz": 5}, "bogus": 1})
    with pytest.raises(ConfigError) as info:
        load_config(user, environ={})
    lines = str(info.value).splitlines()
    assert f"tasks.lease_secondz: unknown key (did you mean 'lease_seconds'?) [from {user}]" in lines
    assert f"bogus: unknown key [from {user}]" in lines


def test_unknown_nested_key_in_overrides_names_the_key_path():
    with pytest.raises(ConfigError, match=r"^server\.rate_limit\.rpm: unknown key .*\[from command line\]$"):
        load_config(overrides={"server": {"rate_limit": {"rpm": 5}}}, environ={})


def test_non_string_yaml_keys_are_reported_as_unknown_keys(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", "tasks:\n  yes: 1\n")
    with pytest.raises(ConfigError, match=r"tasks\.True: unknown key"):
        load_config(user, environ={})


def test_unknown_taskorch_variable_is_an_error_naming_it():
    with pytest.raises(ConfigError) as info:
        load_config(environ={"TASKORCH_TASKS__LEASE_SECS": "5", "TASKORCH_SERVER": "x", "OTHER_VAR": "1"})
    message = str(info.value)
    assert "TASKORCH_TASKS__LEASE_SECS: environment variable does not name a taskorch setting" in message
    assert "did you mean TASKORCH_TASKS__LEASE_SECONDS?" in message
    assert "TASKORCH_SERVER:" in message
    assert "OTHER_VAR" not in message


BAD_ENV_VALUES = {
    "lease-zero": ("TASKORCH_TASKS__LEASE_SECONDS", "0", "tasks.lease_seconds: must be >= 1 (got 0)"),
    "durability-fast": (
        "TASKORCH_STORE__DURABILITY",
        "fast",
        "store.durability: must be one of 'full' or 'normal' (got 'fast')",
    ),
    "port-abc": ("TASKORCH_SERVER__PORT", "abc", "server.port: must be an integer (got 'abc')"),
    "port-too-big": ("TASKORCH_SERVER__PORT", "70000", "server.port: must be <= 65535 (got 70000)"),
    "bool-maybe": (
        "TASKORCH_STORE__INLINE_WRITES",
        "maybe",
        "store.inline_writes: must be true or false (got 'maybe')",
    ),
    "sweep-zero": (
        "TASKORCH_TASKS__SWEEP_INTERVAL_SECONDS",
        "0",
        "tasks.sweep_interval_seconds: must be > 0.0 (got 0.0)",
    ),
    "poll-inf": (
        "TASKORCH_TASKS__POLL_INTERVAL_SECONDS",
        "inf",
        "tasks.poll_interval_seconds: must be a finite number (got inf)",
    ),
}


@pytest.mark.parametrize(("var", "value", "expected"), BAD_ENV_VALUES.values(), ids=BAD_ENV_VALUES.keys())
def test_bad_env_value_is_one_line_naming_key_value_and_variable(var, value, expected):
    with pytest.raises(ConfigError) as info:
        load_config(environ={var: value})
    assert str(info.value) == f"{expected} [from {var}]"
    assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, pydantic.ValidationError)


def test_yaml_values_of_the_wrong_type_are_rejected_not_coerced(tmp_path):
    user = write_yaml(
        tmp_path / "user.yaml",
        {
            "server": {"port": "8080"},
            "tasks": {"lease_seconds": 2.5, "max_attempts": True},
            "store": {"inline_writes": 1},
            "limits": "big",
        },
    )
    with pytest.raises(ConfigError) as info:
        load_config(user, environ={})
    lines = str(info.value).splitlines()
    assert len(lines) == 5
    assert f"server.port: must be an integer (got '8080') [from {user}]" in lines
    assert f"tasks.lease_seconds: must be an integer (got 2.5) [from {user}]" in lines
    assert f"tasks.max_attempts: must be an integer (got True) [from {user}]" in lines
    assert f"store.inline_writes: must be true or false (got 1) [from {user}]" in lines
    assert f"limits: must be a mapping (got 'big') [from {user}]" in lines


def test_lease_longer_than_max_lease_is_an_error():
    with pytest.raises(ConfigError, match=r"lease_seconds \(100\) must be <= max_lease_seconds \(50\)"):
        load_config(overrides={"tasks": {"lease_seconds": 100, "max_lease_seconds": 50}}, environ={})


def test_yaml_syntax_error_names_the_file(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", "tasks: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cannot read config file .*user\.yaml"):
        load_config(user, environ={})


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(user, environ={})


def test_api_keys_never_appear_in_repr_str_or_error_messages(tmp_path):
    cfg = load_config(environ={"TASKORCH_API_KEYS": "s3cret-key"})
    assert "s3cret-key" not in repr(cfg)
    assert "s3cret-key" not in str(cfg)
    assert "s3cret-key" not in cfg.model_dump_json()
    user = write_yaml(tmp_path / "user.yaml", {"server": {"api_keys": "s3cret-key"}})
    with pytest.raises(ConfigError) as info:
        load_config(user, environ={})
    assert "server.api_keys: must be a list" in str(info.value)
    assert "s3cret-key" not in str(info.value)


def test_empty_api_key_is_rejected():
    with pytest.raises(ConfigError, match=r"server\.api_keys\[0\]: must not be empty \[from command line\]"):
        load_config(overrides={"server": {"api_keys": [""]}}, environ={})


def test_config_is_frozen():
    cfg = load_config(environ={})
    with pytest.raises(pydantic.ValidationError):
        cfg.tasks.lease_seconds = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        Config(tasks={"nope": 1})


def test_default_db_path_is_in_the_platformdirs_user_data_dir_and_is_not_created(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = platformdirs.user_data_path("taskorch") / "taskorch.db"
    assert default_db_path() == expected
    assert load_config(environ={}).db_path() == expected
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_db_path_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(environ={"TASKORCH_DB": "~/q.db"}).db_path() == tmp_path / "q.db"


def test_load_config_prints_nothing(tmp_path, capsys):
    load_config(write_yaml(tmp_path / "user.yaml", {"server": {"port": 1}}), environ={})
    with pytest.raises(ConfigError):
        load_config(environ={"TASKORCH_NOPE": "1"})
    assert capsys.readouterr() == ("", "")


def test_resource_dir_finds_the_config_dir_of_the_checkout():
    assert (resource_dir("config") / "default.yaml").is_file()


def test_resource_dir_raises_file_not_found_for_an_unknown_resource():
    with pytest.raises(FileNotFoundError, match="no-such-resource"):
        resource_dir("no-such-resource")


def test_resource_dir_prefers_the_copy_bundled_in_the_wheel(tmp_path, monkeypatch):
    from taskorch import resources

    package = tmp_path / "site" / "taskorch"
    (package / "_data" / "config").mkdir(parents=True)
    (tmp_path / "site" / "config").mkdir()
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    assert resource_dir("config") == package / "_data" / "config"


def test_resource_dir_ignores_a_stray_sibling_dir_outside_a_checkout(tmp_path, monkeypatch):
    from taskorch import resources

    package = tmp_path / "site" / "taskorch"
    package.mkdir(parents=True)
    (tmp_path / "site" / "config").mkdir()
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    with pytest.raises(FileNotFoundError, match="'config' not found"):
        resource_dir("config")


def test_yaml_syntax_error_reports_the_position_without_quoting_the_line(tmp_path):
    user = write_yaml(tmp_path / "user.yaml", "server:\n  api_keys: [s3cret-key\n")
    with pytest.raises(ConfigError, match=r"at line \d+, column \d+") as info:
        load_config(user, environ={})
    assert "s3cret-key" not in str(info.value)
