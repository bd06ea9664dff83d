"""`palr.cli.config_main`, every entry point's main: flags from the config dataclass, the exit code from
what `run` returns (an int), 0 for a returned report, 1 with the reason logged for a refused config."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest

from palr.cli import config_main, server_main
from palr.trtllm_runtime import import_trtllm


@dataclass
class Config:
    users: int = field(default=5, metadata={"help": "how many"})
    name: str = "x"

    def __post_init__(self):
        if self.users < 0:
            raise ValueError(f"--users must be >= 0, got {self.users}")


def main(argv, run, errors=()):
    return config_main(argv, "python -m example", "an example", Config, run, errors, "example failed")


def test_flags_reach_the_config_and_an_int_is_the_exit_code():
    seen = []
    assert main(["--users", "7", "--name", "y"], lambda c: seen.append(c) or 3) == 3
    assert seen == [Config(users=7, name="y")]


@pytest.mark.parametrize("returned", [None, {"users": 943}, [1, 2]], ids=["none", "a-report", "a-list"])
def test_a_returned_report_is_success(returned):
    assert main([], lambda c: returned) == 0


def test_a_refused_config_or_a_listed_error_exits_1_with_the_reason(caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["--users", "-1"], lambda c: 0) == 1
    assert "example failed: --users must be >= 0, got -1" in caplog.text

    def broken(config):
        raise TimeoutError("servers did not come up")

    assert main([], broken, (TimeoutError,)) == 1
    with pytest.raises(KeyError):  # anything not listed is a bug: it propagates
        main([], lambda c: {}["missing"])


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"], lambda c: 0)
    assert e.value.code == 0 and "--users USERS" in capsys.readouterr().out


@dataclass
class Described:
    device: str = field(default="cpu", metadata={"help": "where it runs", "choices": ("cpu", "cuda")})
    gguf: str | None = field(default=None, metadata={"help": "the file (default: where fetch put it)"})
    endpoint: str = field(default="", metadata={"help": "empty = off"})
    k: int = field(default=3, metadata={"help": "how many"})


def test_help_lists_choices_and_shows_a_default_once_and_only_a_real_one(capsys):
    """--device showed DEVICE, hiding cpu/cuda; a help that says its default got "(default: None)" after it; an empty
    default printed "(default: )"."""
    with pytest.raises(SystemExit):
        config_main(["--help"], "python -m example", "", Described, lambda c: 0)
    text = " ".join(capsys.readouterr().out.split())
    assert "--device {cpu,cuda} where it runs (default: cpu)" in text
    assert "the file (default: where fetch put it) --endpoint" in text and "(default: None)" not in text
    assert "empty = off --k" in text and "(default: )" not in text
    assert "--k K how many (default: 3)" in text


async def serve(config):
    """A server module's `serve` (this module stands in as one) whose engine cannot start: the real TensorRT-LLM
    import, which fails on a machine without it."""
    import_trtllm()


def test_a_server_whose_engine_cannot_start_exits_1_with_the_reason_not_a_traceback(caplog):
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM imports here: no engine error to report")
    with caplog.at_level(logging.ERROR):
        assert server_main([], "python -m example_server", "an example", Config, __name__) == 1
    assert "cannot serve: the trtllm engine needs TensorRT-LLM, which is not installed here" in caplog.text


def test_an_unknown_log_level_is_a_usage_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--log-level", "bogus"], lambda c: 0)
    assert e.value.code == 2 and "invalid choice: 'BOGUS'" in capsys.readouterr().err
    assert main(["--log-level", "warning"], lambda c: 0) == 0  # any case
    assert main(["--log-level", "warn"], lambda c: 0) == 0  # every name logging knows
