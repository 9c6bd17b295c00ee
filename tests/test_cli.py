"""The ``fastlora`` command: the demo end to end (few steps), the dispatch, and the argument checks: a mistake is a
usage error (exit 2, one line naming what is allowed) before any work starts."""

import pytest

from fastlora import cli


def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    code = cli.main(["demo", "--steps", "12", "--batch", "4", "--length", "32", "--output", str(tmp_path / "adapter")])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out
    assert "trainable params:" in out and "tokens/s" in out
    # not a terminal: plain progress lines, no bar redrawn with carriage returns
    assert "\r" not in out + captured.err and "fine-tuning: step 12/12, loss" in out
    assert out.count("fine-tuning: step") == 12
    assert "reloaded with fastlora" in out and "reloaded with peft" in out and "DIFFERENT" not in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_dispatch_help_version_and_unknown(capsys):
    import fastlora

    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main([]) == 2  # a command is required: the usage and the error on stderr, as argparse does
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: fastlora" in captured.err
    assert "fastlora: error: a command is required (demo, bench)" in captured.err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastlora {fastlora.__version__}"
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main(["--bogus"]) == 2
    assert "unknown option '--bogus'" in capsys.readouterr().err


def test_demo_help_gives_each_option_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    for option, default in (("--steps", "300"), ("--batch", "8"), ("--length", "64"), ("--lr", "0.003"),
                            ("--seed", "0"), ("--hidden", "128"), ("--layers", "2"), ("--output", "a temporary one")):
        line = " ".join(out.split(option, 2)[-1].split())  # the option's help text, whitespace folded
        assert f"(default: {default}" in line, option
    with pytest.raises(SystemExit):
        cli.main(["demo", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    """Training fails the test: the checks must come first."""
    from fastlora import demo

    def run(*args, **kwargs):
        raise AssertionError("trained before the arguments were checked")

    monkeypatch.setattr(demo, "run", run)


def _usage_error(capsys, argv: list[str]) -> str:
    """The error line of ``fastlora ARGV``, which must be a usage error (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and "Traceback" not in captured.err, captured
    return captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "0"], "argument --hidden: must be an integer ≥ 1, not '0'"),
    (["--hidden", "130"], "--hidden must be a multiple of 8"),
    (["--layers", "0"], "argument --layers: must be an integer ≥ 1, not '0'"),
    (["--steps", "-1"], "argument --steps: must be an integer ≥ 1"),
    (["--batch", "x"], "argument --batch: must be an integer ≥ 1, not 'x'"),
    (["--length", "5000"], "--length must be from 2 to 512"),
    (["--length", "1"], "--length must be from 2 to 512"),
    (["--lr", "-1"], "argument --lr: must be a number > 0, not '-1'"),
    (["--lr", "0"], "argument --lr: must be a number > 0, not '0'"),
    (["--lr", "nan"], "argument --lr: must be a number > 0, not 'nan'"),
])
def test_demo_refuses_bad_values_up_front(capsys, no_training, argv, message):
    line = _usage_error(capsys, ["demo", *argv])
    assert line.startswith("fastlora demo: error: ") and message in line


def test_demo_checks_its_output_folder_before_training(tmp_path, capsys, no_training):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _usage_error(capsys, ["demo", "--output", str(afile)]).endswith(f"--output {afile}: is a file; give a folder")
    assert _usage_error(capsys, ["demo", "--output", str(afile / "adapter")]).endswith(f"{afile} is a file, not a folder")


def test_demo_says_why_it_failed_when_the_loss_did_not_fall(capsys):
    code = cli.main(["demo", "--steps", "1", "--batch", "1", "--length", "8", "--lr", "1e-12", "--hidden", "16",
                     "--layers", "1"])
    captured = capsys.readouterr()
    assert code == 1 and "DIFFERENT" not in captured.out
    assert captured.err.strip().splitlines()[-1].startswith(
        "fastlora demo: the eval loss did not decrease (") and "try more --steps or a larger --lr" in captured.err


def test_the_shared_argument_types_say_what_is_allowed():
    import argparse

    assert cli.positive_int("3") == 3 and cli.non_negative_int("0") == 0 and cli.share("1") == 1.0
    assert cli.probability("0") == 0.0 and cli.comma_list(cli.positive_int)("1, 2,") == [1, 2]
    for parse, text, message in ((cli.positive_int, "1.5", "an integer ≥ 1"), (cli.non_negative_int, "-1", "≥ 0"),
                                 (cli.positive_float, "inf", "a number > 0"), (cli.non_negative_float, "-0.5", "≥ 0"),
                                 (cli.share, "1.01", "from 0 to 1"), (cli.probability, "1", "from 0 to below 1"),
                                 (cli.comma_list(cli.positive_int), " , ", "not empty"),
                                 (cli.one_of(("a", "b")), "c", "choose from a, b")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_an_output_path_is_checked_without_leaving_anything_behind(tmp_path, monkeypatch):
    """check_output makes no folder (the writers make them when they write), tries the nearest existing folder with
    a temporary file it removes, and turns any OS error (an unreadable parent, say) into a usage error."""
    import argparse
    import pathlib

    parser = argparse.ArgumentParser(prog="fastlora bench")

    def refused(path, **kwargs):
        with pytest.raises(SystemExit) as exit_:
            cli.check_output(parser, "--json", str(path), **kwargs)
        assert exit_.value.code == 2

    cli.check_output(parser, "--json", str(tmp_path / "new" / "deeper" / "out.json"))
    assert list(tmp_path.iterdir()) == []  # neither the folders nor the trial file stay
    refused(f"{tmp_path}/out/")  # a folder's name where a file is wanted
    (tmp_path / "a-file").write_text("x")
    refused(tmp_path / "a-file" / "out.json")
    refused(tmp_path / "a-file", folder=True)
    monkeypatch.setattr(pathlib.Path, "exists", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied")))
    refused(tmp_path / "locked" / "out.json")
