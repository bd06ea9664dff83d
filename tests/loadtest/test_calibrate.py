"""`python -m loadtest calibrate`: the SLO file it writes (limits = measured x the stated margins,
loadable by loadtest/slo.py), and that a gate calibrated on the tiny bundle breaks (exit 3) when
the ranking server is slowed (RANKING_INJECT_DELAY_MS, the test-only injected delay)."""

from __future__ import annotations

import math

import pytest

from loadtest.calibrate import CalibrateConfig, calibrate, limit_ms, locust_argv, read_stats, run_locust, slo_toml
from loadtest.servers import ServerProcess
from loadtest.slo import EXIT_BROKEN, SloProfile

STATS = {"Recommend/score": {"requests": 40, "failures": 0, 50: 120.0, 95: 200.0, 99: 260.0},
         "Retrieve": {"requests": 10, "failures": 0, 50: 4.0, 95: 9.0, 99: 11.0},
         "Aggregated": {"requests": 50, "failures": 0, 50: 100.0, 95: 190.0, 99: 250.0}}


def test_limits_are_the_measured_values_times_the_margins_and_the_file_loads(tmp_path):
    path = tmp_path / "slo.toml"
    path.write_text(slo_toml(STATS, CalibrateConfig(), "test load"))
    profile = SloProfile.load(path)
    limits = {rpc.name: rpc.percentiles_ms for rpc in profile.rpcs}
    assert limits["Recommend/score"] == {50: 180.0, 95: 300.0, 99: 520.0}  # 1.5x, 1.5x, 2x
    assert limits["Retrieve"] == {50: 6.0, 95: 14.0, 99: 22.0}
    assert "Aggregated" not in limits and profile.max_error_rate == 0.01
    text = path.read_text()
    assert "Margin: limit = measured x (1.5x p50, 1.5x p95, 2x p99)" in text and "Machine: " in text
    assert "Load: test load" in text


def test_limits_round_up_to_two_significant_digits_and_respect_the_floor():
    assert limit_ms(1234.0, 1.5, 0) == 1900.0 and limit_ms(3.1, 2.0, 0) == 7.0
    assert limit_ms(3.1, 2.0, 25.0) == 25.0
    assert all(limit_ms(v, 1.5, 0) >= v * 1.5 for v in (0.7, 9.9, 101.0, 55555.0))
    assert not math.isnan(limit_ms(0.0, 1.5, 0))


def test_the_task_codes_exceptions_are_read_from_locusts_csv(tmp_path):
    """Locust exits 1 for failed calls and for exceptions in the load test's own code alike; calibrate took both
    as "some calls failed" and wrote limits from a run whose calls were not made. Locust's columns: Count, Message,
    Traceback, Nodes."""
    from loadtest.calibrate import task_exceptions

    path = tmp_path / "calibrated_exceptions.csv"
    assert task_exceptions(path) == []
    path.write_text("Count,Message,Traceback,Nodes\n")
    assert task_exceptions(path) == []
    path.write_text('Count,Message,Traceback,Nodes\n3,KeyError(\'x\'),"Traceback (most recent call last):\n  File ..."'
                    ',local\n')
    assert task_exceptions(path) == ["3x KeyError('x')"]


def test_a_locust_run_that_refuses_its_options_writes_nothing_not_an_earlier_runs_numbers(tmp_path):
    """An unknown option in --locust-args: Locust exits 2 before it writes statistics; the previous calibration's CSV beside
    the output used to be read as this run's, and a new SLO file written from it."""
    out = tmp_path / "calibrated.toml"
    stale = tmp_path / "calibrated_stats.csv"
    stale.write_text("Type,Name,Request Count,Failure Count,50%,95%,99%\n"
                     "grpc,Recommend/score,40,0,120,200,260\n,Aggregated,40,0,120,200,260\n")
    config = CalibrateConfig(out=out, users=1, duration="2s", locust_args="--no-such-option 6", ranking="127.0.0.1:1",
                             retrieval="127.0.0.1:1", work_dir=tmp_path)
    with pytest.raises(RuntimeError, match="Locust exited 2"):
        calibrate(config)
    assert not out.exists() and not stale.exists()


def test_locust_is_given_absolute_paths_and_shell_split_arguments(tmp_path, monkeypatch):
    """Locust runs in the repository: relative paths from a caller elsewhere sent its CSVs there, and calibrate,
    after the whole measurement, found none ("Locust wrote no statistics")."""
    monkeypatch.chdir(tmp_path)
    config = CalibrateConfig(bundle="bundle", locust_args="--tags 'a b' -L WARNING")
    argv = locust_argv("h:1", "h:2", config, "reports/calibrated", slo="my.toml")
    for flag, path in (("--bundle", "bundle"), ("--csv", "reports/calibrated"), ("--slo", "my.toml")):
        assert argv[argv.index(flag) + 1] == str(tmp_path / path)
    assert argv[-6:-2] == ["--tags", "a b", "-L", "WARNING"]  # then --slo FILE
    with pytest.raises(ValueError, match="--locust-args: No closing quotation"):
        CalibrateConfig(locust_args="--tags 'a b")


@pytest.mark.parametrize("servers", [{"ranking": "h:1"}, {"retrieval": "h:2"}])
def test_one_running_server_without_the_other_is_refused(servers):
    """--retrieval alone was ignored: calibrate started its own pair and measured those."""
    with pytest.raises(ValueError, match="--ranking and --retrieval go together"):
        CalibrateConfig(**servers)


LOAD = "--k 3 --candidates 6 --generate-share 0 --retrieve-share 0.3"


@pytest.fixture
def retrieval(tiny_llm_bundle):
    with ServerProcess("retrieval_server", ["--bundle", str(tiny_llm_bundle)]) as server:
        yield server


def test_a_gate_calibrated_here_breaks_when_the_ranking_server_is_slowed_2x(tiny_llm_bundle, retrieval, tmp_path,
                                                                           monkeypatch):
    config = CalibrateConfig(bundle=tiny_llm_bundle, out=tmp_path / "slo" / "calibrated.toml", users=2,
                             duration="6s", locust_args=LOAD, work_dir=tmp_path)
    with ServerProcess("ranking_server", ["--bundle", str(tiny_llm_bundle), "--retrieval", retrieval.target]) as ranking:
        config.ranking, config.retrieval = ranking.target, retrieval.target
        slo = calibrate(config)
    measured = read_stats(tmp_path / "calibrated_stats.csv")["Recommend/score"]
    assert measured["requests"] > 3
    assert [f.name for f in (tmp_path / "slo").iterdir()] == ["calibrated.toml"]  # Locust's CSVs go to --work-dir
    # every Recommend now takes at least its old p99 longer: p50 and p95 at least double
    monkeypatch.setenv("RANKING_INJECT_DELAY_MS", str(max(measured[99], measured[50] * 2)))
    with ServerProcess("ranking_server", ["--bundle", str(tiny_llm_bundle), "--retrieval", retrieval.target]) as slowed:
        run = run_locust(slowed.target, retrieval.target, config, tmp_path / "slowed", slo=slo)
    assert "delayed on purpose" in slowed.log_path.read_text()
    assert run.returncode == EXIT_BROKEN, run.stdout[-3000:]
    assert "BROKEN  Recommend/score p50" in run.stdout


def test_a_run_that_fails_its_calls_writes_no_slo(tiny_llm_bundle, retrieval, tmp_path):
    """k above what the ranking server allows: every Recommend is INVALID_ARGUMENT in a millisecond; limits
    measured on those would gate a broken server."""
    config = CalibrateConfig(bundle=tiny_llm_bundle, out=tmp_path / "calibrated.toml", users=2, duration="2s",
                             locust_args="--k 1000 --candidates 6 --generate-share 0 --retrieve-share 0.3",
                             work_dir=tmp_path)
    with ServerProcess("ranking_server", ["--bundle", str(tiny_llm_bundle), "--retrieval", retrieval.target]) as ranking:
        config.ranking, config.retrieval = ranking.target, retrieval.target
        with pytest.raises(RuntimeError, match=r"error budget \(1\.00%\).*Recommend/score: (\d+) of \1 failed"):
            calibrate(config)
    assert not config.out.exists()


def test_python_m_loadtest_help_says_what_it_runs_and_names_the_other_commands(capsys):
    """`python -m loadtest --help` printed a usage line to stderr and exited 2."""
    from loadtest.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "calibrate (write an SLO file" in out and "python -m loadtest.bench" in out and "locust -f" in out
    assert main([]) == 2 and "python -m loadtest --help lists" in capsys.readouterr().err
