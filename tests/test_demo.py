"""The README's main job runs end to end (shortened) and writes what it promises."""
import re

from upernet_ref.cli.demo import main


def test_demo_runs_and_writes_its_pictures(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["--out", str(out), "--max-iters", "30", "--no-progress",
                 "--forward", "upernet_small_test", "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    # the configurations table with the spec's parameter counts
    assert "upernet_r50_os8_ade20k" in text and "68,914,316" in text and " NO " not in text
    assert "One forward pass of upernet_small_test" in text and "(1, 8, 32, 32)" in text
    # a per-class table, an mIoU above the printed chance level
    found = re.search(r"mIoU ([\d.]+)% vs ([\d.]+)% for random labels", text)
    assert found, text[-2000:]
    assert float(found.group(1)) > float(found.group(2))
    for name in ("curves.png", "predictions.png", "run/last.pt", "run/log.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "predictions.png").stat().st_size > 10_000


def test_unknown_forward_config_stops_before_any_work(capsys):
    import pytest
    with pytest.raises(SystemExit):
        main(["--forward", "nope", "--max-iters", "1"])
    err = capsys.readouterr()
    assert "unknown configuration 'nope'" in err.err
    assert "upernet_r50_os8_voc" not in err.out  # the table was not printed first
