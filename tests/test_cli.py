"""The ``fastlora`` command: the demo end to end (few steps) and the dispatch."""

from fastlora import cli


def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    code = cli.main(["demo", "--steps", "12", "--batch", "4", "--length", "32", "--output", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "trainable params:" in out and "tokens/s" in out
    assert "reloaded with fastlora" in out and "reloaded with peft" in out and "DIFFERENT" not in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_dispatch_help_and_unknown(capsys):
    assert cli.main([]) == 0
    assert cli.main(["nope"]) == 2
    assert "demo" in capsys.readouterr().out
