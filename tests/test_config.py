"""Dataclass settings -> CLI flags and YAML files (kneescreen.config): fast, no Ray."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from kneescreen.config import (
    add_arguments,
    add_config_flag,
    build,
    dump_yaml,
    load_yaml,
    opt,
    parse_with_config,
    to_flat_dict,
)
from kneescreen.errors import KneescreenError


@dataclasses.dataclass(frozen=True)
class Model:
    arch: str = opt("lite0", "backbone", choices=("lite0", "lite1", "lite2"))
    dropout: float = opt(0.2, "dropout before the head")


@dataclasses.dataclass(frozen=True)
class Run:
    input: str = opt(help="where the images are")
    epochs: int = opt(32, "training epochs")
    num_workers: int = opt(2, "Ray Train workers", aliases=("--workers",))
    use_gpu: bool = opt(False, "train on GPUs")
    seed: int | None = opt(None, "random seed (none: random)")
    members: tuple[str, ...] = opt(("a:gray",), "ensemble members name:mode")
    tags: tuple[str, ...] = opt(help="free-form tags", default_factory=tuple)
    model: Model = opt(help="model settings", default_factory=Model)
    secret_knob: int = opt(7, "YAML only", cli=False)
    out_dir: str = opt("out", "output folder", flag="--out")


@dataclasses.dataclass(frozen=True)
class Files:
    paths: tuple[str, ...] = opt((), "files to look at", positional=True)
    mode: str = opt("fast", "how", choices=("fast", "slow"))


@dataclasses.dataclass(frozen=True)
class Clash:
    dropout: float = opt(0.1)
    model: Model = opt(default_factory=Model)


def _parser(cls=Run) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kneescreen test")
    add_config_flag(parser)
    parser.add_argument("--verbose", action="store_true")
    add_arguments(parser, cls)
    return parser


def _resolve(argv, values=None, cls=Run, source="run.yaml"):
    args = parse_with_config(_parser(cls), argv)
    return build(cls, args, values, source=source)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_flags_have_help_defaults_and_required_marker():
    text = " ".join(_parser().format_help().split())
    for expected in ("--epochs EPOCHS training epochs (default: 32)", "--input INPUT where the images are (required)",
                     "--use-gpu, --no-use-gpu train on GPUs (default: false)",
                     "--members MEMBERS ensemble members name:mode (default: a:gray; repeatable, comma-separated)",
                     "--num-workers NUM_WORKERS, --workers NUM_WORKERS",
                     "--arch {lite0,lite1,lite2} backbone (default: lite0)", "--out OUT_DIR", "--config FILE"):
        assert expected in text
    assert "secret" not in text and "--model" not in text


def test_namespace_holds_only_what_was_typed():
    args = parse_with_config(_parser(), ["--input", "x", "--verbose"])
    assert vars(args) == {"config": None, "verbose": True, "input": "x"}


def test_defaults_and_ignored_namespace_attributes():
    cfg = _resolve(["--input", "x", "--verbose"])
    assert cfg == Run(input="x")
    assert (cfg.epochs, cfg.members, cfg.tags, cfg.model, cfg.secret_knob) == (32, ("a:gray",), (), Model(), 7)


def test_alias_and_flag_override():
    assert _resolve(["--input", "x", "--workers", "8"]).num_workers == 8
    cfg = _resolve(["--input", "x", "--num-workers", "3", "--out", "o2"])
    assert cfg == Run(input="x", num_workers=3, out_dir="o2")


def test_bool_on_and_off():
    assert _resolve(["--input", "x", "--use-gpu"]).use_gpu is True
    assert _resolve(["--input", "x", "--no-use-gpu"], {"use_gpu": True}).use_gpu is False


def test_tuple_flag_repeats_and_splits_on_commas():
    cfg = _resolve(["--input", "x", "--members", "a:gray,b:rgb", "--members", "c:gray", "--tags", " t1 , t2"])
    assert cfg.members == ("a:gray", "b:rgb", "c:gray")
    assert cfg.tags == ("t1", "t2")
    assert _resolve(["--input", "x", "--members", ""]).members == ()  # an empty flag clears the default


def test_nested_dataclass_is_flattened():
    cfg = _resolve(["--input", "x", "--arch", "lite2", "--dropout", "0.5"])
    assert cfg.model == Model(arch="lite2", dropout=0.5)
    assert _resolve(["--input", "x"], {"dropout": 0.3}).model.dropout == 0.3
    nested = _resolve(["--input", "x"], {"model": {"arch": "lite1"}})
    assert nested.model == Model(arch="lite1")


def test_name_clash_after_flattening_fails_at_add_time():
    with pytest.raises(ValueError, match="dropout"):
        add_arguments(argparse.ArgumentParser(), Clash)


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    path = _write(tmp_path, "input: from-yaml\nepochs: 5\nnum-workers: 4\narch: lite1\n")
    parser = _parser()
    args = parse_with_config(parser, ["--config", path, "--epochs", "9"])
    cfg = build(Run, args, load_yaml(args.config), source=args.config)
    assert (cfg.input, cfg.epochs, cfg.num_workers, cfg.model.arch, cfg.use_gpu) == ("from-yaml", 9, 4, "lite1", False)


def test_required_field_from_yaml_only_and_missing_required():
    assert build(Run, values={"input": "y"}).input == "y"
    with pytest.raises(KneescreenError) as err:
        _resolve([])
    assert "missing required `input` (give --input or `input:` in the --config file)" in str(err.value)


@pytest.mark.parametrize(("values", "fragment"), [
    ({"epochs": "5"}, "run.yaml: `epochs` must be an integer, got '5' (str)"),
    ({"use_gpu": "yes"}, "run.yaml: `use_gpu` must be true or false, got 'yes' (str)"),
    ({"use_gpu": 1}, "`use_gpu` must be true or false, got 1 (int)"),
    ({"epochs": True}, "`epochs` must be an integer, got True (bool)"),
    ({"out_dir": ["a", "b"]}, "`out_dir` must be a string, got ['a', 'b'] (list)"),
    ({"out_dir": None}, "`out_dir` must be a string, got None"),
    ({"members": ["a", 3]}, "`members[1]` must be a string, got 3 (int)"),
    ({"dropout": "0.1"}, "`dropout` must be a number, got '0.1' (str)"),
    ({"seed": "1"}, "`seed` must be an integer or null"),
    ({"model": 3}, "`model` must be a mapping"),
    ({"arch": "resnet"}, "`arch` must be one of lite0,lite1,lite2, got 'resnet'"),
    ({"model": {"arch": "resnet"}}, "`arch` must be one of"),
])
def test_type_errors_name_the_key_and_source(values, fragment):
    with pytest.raises(KneescreenError) as err:
        build(Run, values={"input": "x", **values}, source="run.yaml")
    assert fragment in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(KneescreenError) as err:
        build(Run, values={"input": "x", "epoch": 3}, source="run.yaml")
    msg = str(err.value)
    assert "run.yaml: unknown setting `epoch`" in msg and "did you mean `epochs`" in msg
    assert "num_workers" in msg and "arch" in msg and "secret_knob" in msg
    with pytest.raises(KneescreenError, match="unknown setting `epochs`"):
        build(Run, values={"input": "x", "model": {"epochs": 3}})


def test_lenient_but_typed_values():
    cfg = build(Run, values={"input": "x", "dropout": 1, "members": "solo:gray", "seed": None, "secret_knob": 3})
    assert cfg.model.dropout == 1.0 and isinstance(cfg.model.dropout, float)
    assert cfg.members == ("solo:gray",)  # one string -> one element, never split into characters
    assert (cfg.seed, cfg.secret_knob) == (None, 3)
    assert build(Run, values={"input": "x", "members": ["p", "q"]}).members == ("p", "q")


def test_choices_enforced_on_flags(capsys):
    with pytest.raises(SystemExit):
        parse_with_config(_parser(), ["--input", "x", "--arch", "resnet"])
    assert "invalid choice: 'resnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_with_config(_parser(), ["--input", "x", "--epochs", "five"])
    assert "invalid int value: 'five'" in capsys.readouterr().err


def test_positional_tuple_field():
    assert _resolve([], cls=Files) == Files()
    assert _resolve(["a.dcm", "b.dcm,c.dcm", "--mode", "slow"], cls=Files) == Files(("a.dcm", "b.dcm", "c.dcm"), "slow")
    assert _resolve([], {"paths": ["y.dcm"]}, cls=Files).paths == ("y.dcm",)
    with pytest.raises(KneescreenError, match="`mode` must be one of fast,slow"):
        build(Files, values={"mode": "medium"})


@pytest.mark.parametrize("cfg", [
    Run(input="x"),
    Run(input="yes", epochs=1, num_workers=0, use_gpu=True, seed=0, members=(), tags=("null", "1", "a,b"),
        model=Model("lite2", 0.0), secret_knob=-1, out_dir=""),
    Run(input="s3://b/k", seed=None, model=Model(dropout=1e-7)),
])
def test_dump_yaml_round_trip(cfg):
    text = dump_yaml(cfg)
    assert text.startswith("# kneescreen Run config: replay with --config\n")
    loaded = yaml.safe_load(text)
    assert list(loaded) == ["input", "epochs", "num_workers", "use_gpu", "seed", "members", "tags", "arch",
                            "dropout", "secret_knob", "out_dir"]
    assert loaded == to_flat_dict(cfg)
    assert build(Run, values=loaded) == cfg


def test_to_flat_dict_is_plain():
    flat = to_flat_dict(Run(input="x", members=("a", "b")))
    assert flat["members"] == ["a", "b"] and flat["arch"] == "lite0" and "model" not in flat


def test_load_yaml_reads_and_normalises(tmp_path):
    assert load_yaml(_write(tmp_path, "")) == {}
    assert load_yaml(_write(tmp_path, "# only a comment\n")) == {}
    assert load_yaml(_write(tmp_path, "num-workers: 3\nuse_gpu: true\n")) == {"num_workers": 3, "use_gpu": True}


@pytest.mark.parametrize(("text", "fragment"), [
    ("- a\n- b\n", "must hold a mapping"),
    ("just a string\n", "must hold a mapping"),
    ("epochs: [1, 2\n", "is not valid YAML"),
    ("a: 1\na_b: 2\na-b: 3\n", "given twice"),
])
def test_load_yaml_errors(tmp_path, text, fragment):
    with pytest.raises(KneescreenError, match=fragment):
        load_yaml(_write(tmp_path, text))


def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(KneescreenError, match="does not exist"):
        load_yaml(str(tmp_path / "nope.yaml"))


@dataclasses.dataclass(frozen=True)
class Single:
    target: str = opt(help="what to inspect", positional=True, choices=("a", "b"))
    sizes: tuple[int, ...] = opt((224, 256), "input sizes")
    zero: int = opt(0, "shown as 0, not false")


def test_positional_scalar_int_tuple_and_default_display(capsys):
    assert _resolve(["b"], cls=Single) == Single("b")
    assert _resolve([], {"target": "a"}, cls=Single).target == "a"
    assert _resolve(["a", "--sizes", "1,2", "--sizes", "3"], cls=Single).sizes == (1, 2, 3)
    with pytest.raises(KneescreenError, match=r"missing required `target` \(give TARGET or `target:`"):
        _resolve([], cls=Single)
    with pytest.raises(SystemExit):
        parse_with_config(_parser(Single), ["c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_with_config(_parser(Single), ["a", "--sizes", "1,x"])
    assert "invalid int value: 'x'" in capsys.readouterr().err
    with pytest.raises(KneescreenError, match=r"`sizes\[0\]` must be an integer"):
        build(Single, values={"target": "a", "sizes": ["1"]})
    text = " ".join(_parser(Single).format_help().split())
    assert "(default: 0)" in text and "(default: 224,256; repeatable, comma-separated)" in text


def test_unsupported_definitions_fail_at_add_time():
    @dataclasses.dataclass(frozen=True)
    class Bad:
        flag: bool = opt(False, positional=True)

    @dataclasses.dataclass(frozen=True)
    class Dup:
        a: int = opt(1, aliases=("--b",))
        b: int = opt(2)

    for cls in (Bad, Dup):
        with pytest.raises(ValueError):
            add_arguments(argparse.ArgumentParser(), cls)


def test_load_yaml_rejects_binary(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"\xff\xfe\x00\x00garbage\x80")
    with pytest.raises(KneescreenError, match="x.yaml"):
        load_yaml(str(path))
