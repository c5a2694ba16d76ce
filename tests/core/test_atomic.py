"""atomic.py: one writer for text, JSON and binary files and folders; one mode (0644 / 0755); umask untouched."""

import os
import stat
import threading

import pytest

from tunesmith import atomic


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_leaves_0644_files_and_0755_folders(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "héllo")
    atomic.write_json(tmp_path / "b.json", {"x": 1})
    atomic.write_bytes(tmp_path / "c.png", b"\x89PNG\r\n\x1a\n")
    with atomic.atomic_file(tmp_path / "d.bin") as tmp:
        tmp.write_bytes(b"\x00\x01")
    with atomic.atomic_dir(tmp_path / "folder") as folder:
        (folder / "inside.txt").write_text("x")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.json").read_text() == '{\n  "x": 1\n}\n'
    assert (tmp_path / "c.png").read_bytes() == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "d.bin").read_bytes() == b"\x00\x01"
    assert [mode(tmp_path / n) for n in ("a.txt", "b.json", "c.png", "d.bin")] == [0o644] * 4
    assert mode(tmp_path / "folder") == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.png", "d.bin", "folder"]  # no temps


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError), atomic.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash in the middle")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_writes_never_touch_the_process_umask(tmp_path, monkeypatch):
    """os.umask can only be read by setting it; a writer that did so would race with other threads."""
    calls = []
    monkeypatch.setattr(os, "umask", lambda *a: calls.append(a) or 0o022)
    threads = [threading.Thread(target=atomic.write_text, args=(tmp_path / f"{i}.txt", str(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    atomic.write_bytes(tmp_path / "x.png", b"png")
    with atomic.atomic_dir(tmp_path / "d"):
        pass
    assert calls == []
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == [f"{i}.txt" for i in range(8)]


def test_loss_curve_png_goes_through_the_atomic_writer(tmp_path):
    from tunesmith.eval.plots import plot_loss_curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}, "train_loss": {3 - s / 10}}}\n' for s in range(1, 6)))
    out = plot_loss_curves(metrics, tmp_path / "loss_curves.png")
    assert out.read_bytes()[:4] == b"\x89PNG" and mode(out) == 0o644
