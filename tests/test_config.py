"""Strict YAML configs: unknown keys, types, `key.sub=value` overrides, errors, round trips."""
from dataclasses import dataclass, field

import pytest
import yaml

from pcmnet.config import (ConfigError, apply_overrides, from_dict, load_config, parse_override,
                           save_config, to_dict)
from pcmnet.train.config import TrainConfig


@dataclass
class Inner:
    width: int = 8
    rate: float = 0.5
    flag: bool = False
    name: str = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    extra: dict | None = None
    maybe: int | None = None


@dataclass
class Outer:
    model: Inner = field(default_factory=Inner)
    other: Inner | None = None
    seed: int = 0


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_values_from_yaml(tmp_path):
    p = write(tmp_path, "model:\n  width: 16\n  rate: 2\n  flag: true\n  sizes: [3, 4, 5]\nseed: 7\n")
    cfg = load_config(Outer, p)
    assert cfg.model.width == 16 and cfg.seed == 7
    assert cfg.model.rate == 2.0 and isinstance(cfg.model.rate, float)  # int -> float
    assert cfg.model.flag is True
    assert cfg.model.sizes == [3, 4, 5]
    assert cfg.model.name == "a" and cfg.other is None  # untouched defaults


def test_unknown_key_names_the_full_dotted_key(tmp_path):
    p = write(tmp_path, "model:\n  widht: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert "'model.widht'" in msg and "\n" not in msg
    assert "width" in msg  # lists the keys that do exist
    with pytest.raises(ConfigError, match=r"'other\.nope'"):
        load_config(Outer, overrides=["other.nope=1"])
    with pytest.raises(ConfigError, match=r"'sede'"):
        from_dict(Outer, {"sede": 1})
    # deep in the real training config
    with pytest.raises(ConfigError, match=r"'data\.train\.pth'"):
        load_config(TrainConfig, overrides=["data.train.pth=x.json"])


@pytest.mark.parametrize("override, fragment", [
    ("model.width=abc", "'model.width' must be an integer"),
    ("model.width=2.5", "'model.width' must be an integer"),
    ("model.width=true", "'model.width' must be an integer"),
    ("model.rate=fast", "'model.rate' must be a number"),
    ("model.rate=false", "'model.rate' must be a number"),
    ("model.flag=1", "'model.flag' must be true or false"),
    ("model.name=[1,2]", "'model.name' must be a string"),
    ("model.extra=5", "'model.extra' must be a mapping"),
    ("model=3", "'model' must be a mapping"),
    ("model.sizes=[1, x]", "'model.sizes[1]' must be an integer"),
])
def test_type_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, overrides=[override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_overrides_parse_numbers_lists_booleans(tmp_path):
    assert parse_override("optim.lr=1e-4") == (["optim", "lr"], 1e-4)  # YAML 1.1 reads '1e-4' as a str
    assert parse_override("a=1E5") == (["a"], 1e5)
    assert parse_override("a=.5") == (["a"], 0.5)
    assert parse_override("a=3") == (["a"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=false") == (["a"], False)
    assert parse_override("a=runs/v1.2") == (["a"], "runs/v1.2")  # a path stays a string
    assert parse_override("a=x=y") == (["a"], "x=y")  # split at the first '='
    assert parse_override("a=") == (["a"], "")
    for bad in ("novalue", "=3"):
        with pytest.raises(ConfigError):
            parse_override(bad)

    p = write(tmp_path, "model:\n  width: 16\n  rate: 0.25\n")
    cfg = load_config(Outer, p, ["model.rate=1e-4", "model.width=32", "model.flag=true",
                                 "model.sizes=[7,8]", "seed=3", "other.width=5", "model.name=1.5"])
    assert cfg.model.rate == pytest.approx(1e-4) and cfg.model.width == 32 and cfg.model.flag is True
    assert cfg.model.sizes == [7, 8] and cfg.seed == 3
    assert cfg.other == Inner(width=5)  # a None section is created by its override
    assert cfg.model.name == "1.5"
    # an int-valued float (1e3) is fine for an int field
    assert load_config(Outer, overrides=["model.width=1e3"]).model.width == 1000
    # later overrides win
    assert load_config(Outer, overrides=["seed=1", "seed=2"]).seed == 2


def test_override_into_a_null_section_of_the_file(tmp_path):
    # `other:` (null) in YAML, e.g. a file written by --print-config, then `other.width=4`
    p = write(tmp_path, "other:\nseed: 1\n")
    cfg = load_config(Outer, p, ["other.width=4"])
    assert cfg.other == Inner(width=4)
    p = write(tmp_path, "model: 3\n")
    with pytest.raises(ConfigError, match="'model' is not a section"):
        load_config(Outer, p, ["model.width=4"])


def test_bad_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "model:\n  width: 16\n  rate: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert str(p) in msg and "not valid YAML" in msg and "\n" not in msg
    line = int(msg.split(" line ")[1].split()[0])
    # PyYAML reports where it noticed the problem: the unclosed list opened on line 3
    assert 3 <= line <= 5
    p2 = write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match="top level of a config must be a mapping"):
        load_config(Outer, p2)
    p3 = tmp_path / "latin1.yaml"
    p3.write_bytes("seed: 3  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8"):
        load_config(Outer, p3)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(Outer, write(tmp_path, "")) == Outer()


def test_train_config_round_trip(tmp_path):
    cfg = load_config(TrainConfig, overrides=[
        "optim.lr=1e-4", "optim.betas=[0.8,0.9]", "model.width=64", "model.lm_config.n_layer=1",
        "data.train.path=a.json", "data.val.path=b.json", "data.val.limit=3", "run.tensorboard=false",
        "optim.max_steps=10"])
    d = to_dict(cfg)
    assert d["data"]["val"]["limit"] == 3 and d["model"]["lm_config"] == {"n_layer": 1}
    back = from_dict(TrainConfig, d)
    assert back == cfg
    # and through a YAML file, as the trainer saves it
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(TrainConfig, tmp_path / "saved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["optim"]["lr"] == pytest.approx(1e-4)
    assert TrainConfig() == from_dict(TrainConfig, to_dict(TrainConfig()))


def test_apply_overrides_returns_nested_dict():
    d = apply_overrides({"a": {"b": 1}}, ["a.c=2", "x.y.z=on"])
    assert d == {"a": {"b": 1, "c": 2}, "x": {"y": {"z": True}}}
