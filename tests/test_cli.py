"""The ``fastlora`` command: the demo end to end (few steps) and the dispatch."""

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

    assert cli.main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastlora {fastlora.__version__}"
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main(["--bogus"]) == 2
    assert "unknown option '--bogus'" in capsys.readouterr().err


def test_demo_help_gives_each_option_its_default(capsys):
    import pytest

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
