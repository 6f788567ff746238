"""Tests for gradsync.flags: flags derived from dataclasses, and their round trip.

This module uses ``from __future__ import annotations`` on purpose: every annotation below
is a string that gradsync.flags has to resolve.
"""

from __future__ import annotations

import argparse
import pathlib
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from gradsync.flags import add_dataclass_arguments, dataclass_from_args, to_argv


@dataclass
class SampleConfig:
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    epochs: int = field(default=3, metadata={"help": "passes over the data"})
    name: str = field(default="run", metadata={"help": "run name, 100% free-form"})
    amp: bool = field(default=False, metadata={"help": "mixed precision"})
    shuffle: bool = True
    seed: int | None = field(default=None, metadata={"help": "random seed"})
    tag: Optional[str] = field(default=None, metadata={"help": "label (default: the name)"})
    optimizer: Literal["sgd", "adam"] = field(default="sgd", metadata={"help": "optimizer"})
    bits: Literal[8, 16, 32] = 32
    mode: Literal["a", "b"] | None = None
    out: pathlib.Path = pathlib.Path("runs")
    internal: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class RequiredConfig:
    world: int
    verbose: bool


def parser_for(cls: type, **kwargs: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    add_dataclass_arguments(parser, cls, **kwargs)  # type: ignore[arg-type]
    return parser


def parse(cls: type, argv: list[str], **kwargs: object) -> object:
    return dataclass_from_args(cls, parser_for(cls, **kwargs).parse_args(argv))


@pytest.mark.timeout(60)
def test_defaults_come_from_fields() -> None:
    assert parse(SampleConfig, []) == SampleConfig()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "config",
    [
        SampleConfig(),
        SampleConfig(
            lr=1e-5, epochs=-2, name="-starts-with-dash", amp=True, shuffle=False, seed=0,
            tag="", optimizer="adam", bits=8, mode="b", out=pathlib.Path("/tmp/x y"),
        ),
        SampleConfig(lr=0.1 + 0.2, name="a=b --c", seed=-7, tag="None"),
    ],
)
def test_round_trip(config: SampleConfig) -> None:
    assert parse(SampleConfig, to_argv(config)) == config


@pytest.mark.timeout(60)
def test_flags_and_types() -> None:
    config = parse(
        SampleConfig,
        ["--lr", "0.5", "--epochs", "7", "--amp", "--no-shuffle", "--seed", "4",
         "--optimizer", "adam", "--bits", "16", "--out", "o"],
    )
    assert config == SampleConfig(
        lr=0.5, epochs=7, amp=True, shuffle=False, seed=4, optimizer="adam", bits=16,
        out=pathlib.Path("o"),
    )
    assert isinstance(config.bits, int)


@pytest.mark.timeout(60)
def test_to_argv_lists_every_field_but_none() -> None:
    assert to_argv(SampleConfig(seed=1)) == [
        "--lr=0.1", "--epochs=3", "--name=run", "--no-amp", "--shuffle", "--seed=1",
        "--optimizer=sgd", "--bits=32", "--out=runs",
    ]


@pytest.mark.timeout(60)
def test_help_text_choices_and_defaults() -> None:
    text = " ".join(parser_for(SampleConfig).format_help().split())
    for expected in [
        "--lr FLOAT learning rate (default: 0.1)",
        "--epochs INT passes over the data (default: 3)",
        "run name, 100% free-form (default: run)",
        "--amp, --no-amp mixed precision (default: False)",
        "--optimizer {sgd,adam} optimizer (default: sgd)",
        "--seed INT random seed (default: None)",
    ]:
        assert expected in text
    assert text.count("(default: False)") == 1  # no doubled default from argparse
    assert "label (default: the name) --optimizer" in text  # an explained default is kept
    assert "--internal" not in text  # init=False fields get no flag


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "argv", [["--optimizer", "rmsprop"], ["--bits", "12"], ["--epochs", "x"], ["--mode", "c"]]
)
def test_invalid_values_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser_for(SampleConfig).parse_args(argv)


@pytest.mark.timeout(60)
def test_post_init_value_error_propagates() -> None:
    with pytest.raises(ValueError, match="lr must be positive, got -1.0"):
        parse(SampleConfig, ["--lr=-1"])


@pytest.mark.timeout(60)
def test_required_fields() -> None:
    parser = parser_for(RequiredConfig)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    config = RequiredConfig(world=4, verbose=False)
    assert to_argv(config) == ["--world=4", "--no-verbose"]
    assert dataclass_from_args(RequiredConfig, parser.parse_args(to_argv(config))) == config


@pytest.mark.timeout(60)
def test_exclude_keeps_default() -> None:
    parser = parser_for(SampleConfig, exclude={"out", "epochs"})
    assert "--out" not in parser.format_help()
    config = SampleConfig(epochs=3, lr=0.2)
    argv = to_argv(config, exclude={"out", "epochs"})
    assert "--out=runs" not in argv
    assert dataclass_from_args(SampleConfig, parser.parse_args(argv)) == config


@pytest.mark.timeout(60)
def test_namespace_with_other_arguments() -> None:
    parser = parser_for(SampleConfig)
    parser.add_argument("command")
    assert dataclass_from_args(SampleConfig, parser.parse_args(["train", "--amp"])) == (
        SampleConfig(amp=True)
    )


@dataclass
class ListConfig:
    sizes: list[int] = field(default_factory=list)


@dataclass
class UnionConfig:
    x: int | str = 0


@dataclass
class BoolLiteralConfig:
    x: Literal[True, False] = True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cls", [ListConfig, UnionConfig, BoolLiteralConfig])
def test_unsupported_types_fail_when_building_the_parser(cls: type) -> None:
    with pytest.raises(TypeError, match=f"{cls.__name__}.x|{cls.__name__}.sizes"):
        parser_for(cls)


@pytest.mark.timeout(60)
def test_none_without_none_default_cannot_be_expressed() -> None:
    @dataclass
    class C:
        seed: int | None = 3

    with pytest.raises(ValueError, match="--seed"):
        to_argv(C(seed=None))


@pytest.mark.timeout(60)
def test_not_a_dataclass() -> None:
    with pytest.raises(TypeError):
        parser_for(int)
    with pytest.raises(TypeError):
        to_argv(SampleConfig)
