"""Config: typed sections, unknown keys named with the closest valid key, --set overrides, resolved output."""

import pytest
import yaml

from tunesmith.config import ConfigError, load_config, parse_override, resolved_yaml


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_dotted_path_and_closest_key(tmp_path):
    path = write(tmp_path, "train:\n  learning_rat: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.learning_rat" in message
    assert "did you mean 'train.learning_rate'" in message
    assert str(path) in message


def test_unknown_nested_key_and_wrong_type(tmp_path):
    path = write(tmp_path, "method:\n  lora:\n    rank: 8\ntrain:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "method.lora.rank" in message and "method.lora.r" in message
    assert "train.batch_size" in message and "'many'" in message


def test_set_overrides_any_key_with_typed_values(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 2e-4\n")
    config = load_config(path, ["train.learning_rate=1e-4", "method.lora.r=8", "data.packing=false",
                                "method.lora.target_modules=[q_proj,v_proj]"])
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.method.lora.r == 8
    assert config.data.packing is False
    assert config.method.lora.target_modules == ["q_proj", "v_proj"]
    assert config.output.name == "run"  # from the file name


def test_set_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(write(tmp_path, "{}"), ["train.epoch=2"])


def test_parse_override_requires_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.learning_rate")


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(write(tmp_path, "method:\n  name: lora\n  lora:\n    r: 4\n"))
    again = write(tmp_path, resolved_yaml(config))
    assert load_config(again) == config
    assert yaml.safe_load(resolved_yaml(config))["method"]["lora"]["r"] == 4


def test_relative_data_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    config = load_config(write(tmp_path, "data:\n  train: [train.jsonl]\n"))
    assert config.data.train == [str((tmp_path / "train.jsonl").resolve())]
