"""train -> assign -> evaluate -> export on tiny generated data, through the Python API."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from imgcluster import assign, evaluate, export, train
from imgcluster.errors import UsageError
from imgcluster.exporting import place, rename_noreplace
from imgcluster.labels import read_labels
from imgcluster.report import Reporter, show_path

from conftest import make_bad_files, make_toy_folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_writes_a_complete_run_folder(toy: Path, tmp_path: Path) -> None:
    result = train([toy], 3, runs_dir=tmp_path / "runs")
    run = result.run_dir
    assert run == tmp_path / "runs" / "toy-kmeans"
    names = sorted(p.name for p in run.iterdir())
    expected = [
        "config.toml",
        "embeddings.npy",
        "labels.csv",
        *(["labels.parquet"] if find_spec("pyarrow") else []),
        "model.json",
        "model.safetensors",
        "sheets",
        "train.log.jsonl",
    ]
    assert names == expected  # and no temporary files left behind
    rows = _rows(run / "labels.csv")
    assert list(rows[0]) == ["path", "cluster", "confidence", "distance"]
    assert len(rows) == 36 and sorted(result.sizes) == [12, 12, 12]
    assert np.load(run / "embeddings.npy").shape[0] == 36
    log = [json.loads(line) for line in (run / "train.log.jsonl").read_text().splitlines()]
    assert log[-1]["phase"] == "done" and log[-1]["images"] == 36
    assert json.loads((run / "model.json").read_text())["method"] == "kmeans"


def test_toy_classes_are_recovered(toy: Path, tmp_path: Path) -> None:
    run = train([toy], 3, runs_dir=tmp_path / "runs").run_dir
    ev = evaluate(run / "labels.csv")
    assert ev.truth == "auto" and ev.classes == ["centre", "left", "top"]
    assert ev.acc == 1.0 and ev.nmi == pytest.approx(1.0) and ev.ari == pytest.approx(1.0)
    assert ev.silhouette is not None and ev.silhouette > 0.3


def test_runs_are_never_overwritten_without_force(toy: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = train([toy], 3, runs_dir=runs).run_dir
    second = train([toy], 3, runs_dir=runs).run_dir
    assert second.name == "toy-kmeans-2" and first.exists()
    with pytest.raises(UsageError, match="--force"):
        train([toy], 3, out=first)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    train([toy], 2, out=first, force=True)
    assert (first / "model.safetensors").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.joinpath("runs").iterdir()) == [
        "toy-kmeans",
        "toy-kmeans-2",
    ]


def test_a_failed_forced_run_puts_the_old_run_back(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train([toy], 3, out=out)
    before = (out / "labels.csv").read_bytes()
    with pytest.raises(UsageError):
        train([toy], 1000, out=out, force=True)  # fails: more clusters than images
    assert (out / "labels.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "toy"]


def test_same_seed_same_labels(toy: Path, tmp_path: Path) -> None:
    a = train([toy], 3, out=tmp_path / "a", seed=3).run_dir
    b = train([toy], 3, out=tmp_path / "b", seed=3).run_dir
    assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()


def test_assign_reproduces_training_labels(toy: Path, tmp_path: Path) -> None:
    run = train([toy], 3, runs_dir=tmp_path / "runs").run_dir
    out = tmp_path / "assigned.csv"
    result = assign(run, [toy], out=out)
    assert result.images == 36
    trained = {r["path"]: r["cluster"] for r in _rows(run / "labels.csv")}
    assigned = {str(Path(r["path"]).relative_to(toy)): r["cluster"] for r in _rows(out)}
    assert assigned == trained


def test_assign_streams_many_chunks_with_workers(tmp_path: Path) -> None:
    folder = make_toy_folder(tmp_path / "big", per_class=30)
    run = train([folder], 3, out=tmp_path / "run").run_dir
    out = tmp_path / "a.csv"
    assign(run, [folder], out=out, workers=2)
    trained = {r["path"]: r["cluster"] for r in _rows(run / "labels.csv")}
    assigned = {str(Path(r["path"]).relative_to(folder)): r["cluster"] for r in _rows(out)}
    assert assigned == trained


def test_bad_files_are_skipped_everywhere(toy: Path, tmp_path: Path) -> None:
    expected = make_bad_files(toy / "junk")
    result = train([toy], 3, out=tmp_path / "run")
    assert result.images == 36 and result.skipped == len(expected)
    a = assign(result.run_dir, [toy], out=tmp_path / "a.csv")
    assert a.images == 36 and sorted(Path(p).name for p, _ in a.skipped) == sorted(expected)


def test_evaluate_with_a_truth_csv_and_without_truth(toy: Path, tmp_path: Path) -> None:
    run = train([toy], 3, out=tmp_path / "run").run_dir
    truth = tmp_path / "truth.csv"
    rows = _rows(run / "labels.csv")
    with open(truth, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for r in rows[:30]:  # some images without truth
            w.writerow([r["path"], r["path"].split("/")[0].upper()])
    reporter = Reporter(quiet=True)
    ev = evaluate(run / "labels.csv", truth=str(truth), reporter=reporter)
    assert ev.scored == 30 and ev.acc == 1.0 and ev.classes == ["CENTRE", "LEFT", "TOP"]
    assert reporter.warnings == [
        f"6 labelled images have no ground truth in {show_path(truth)}; scoring the others"
    ]
    free = evaluate(run, truth="none")  # a run folder means its labels.csv
    assert (
        free.acc is None
        and free.sizes == {0: 12, 1: 12, 2: 12}
        and free.balance == pytest.approx(1)
    )
    with open(truth, "a") as fh:
        fh.write("not/there.png,X\n")
    unknown = r"truth\.csv: 1 path is not in the labels, e\.g\. not/there\.png"
    with pytest.raises(UsageError, match=unknown):
        evaluate(run / "labels.csv", truth=str(truth))
    truth.write_text("path,label\n")  # a header alone: an error naming the file, no warning
    with pytest.raises(UsageError, match=r"truth\.csv: no rows"):
        evaluate(run / "labels.csv", truth=str(truth))


def test_truth_csv_from_a_spreadsheet_and_rows_that_disagree(toy: Path, tmp_path: Path) -> None:
    run = train([toy], 3, out=tmp_path / "run").run_dir
    first, second = (r["path"] for r in _rows(run / "labels.csv")[:2])
    truth = tmp_path / "truth.csv"
    # a byte-order mark and CRLF, as spreadsheets save "CSV UTF-8"; blank lines; one image
    # twice, spelled two ways, with the same class
    truth.write_bytes(f"\ufeffpath,label\r\n\r\n{first},A\r\n./{first},A\r\n".encode())
    assert evaluate(run / "labels.csv", truth=str(truth)).scored == 1
    truth.write_text(f"path,label\n{first},A\n{second},B\n./{first},B\n")
    with pytest.raises(UsageError, match=r"truth\.csv: line 4 gives \./.* 'B', line 2 gave it 'A'"):
        evaluate(run / "labels.csv", truth=str(truth))
    truth.write_text(f"path,label\n{first},A\n{second}\n")
    with pytest.raises(UsageError, match=r"truth\.csv: line 3 is not path,label"):
        evaluate(run / "labels.csv", truth=str(truth))
    labels = (run / "labels.csv").read_text()
    (run / "labels.csv").write_bytes(b"\xef\xbb\xbf" + labels.encode())  # saved again by one
    assert evaluate(run / "labels.csv", truth="none").sizes == {0: 12, 1: 12, 2: 12}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["copy", "link", "hardlink", "move"])
def test_export_modes(toy: Path, tmp_path: Path, mode: str) -> None:
    run = train([toy], 3, out=tmp_path / "run").run_dir
    before = {p.relative_to(toy).as_posix(): _digest(p) for p in toy.rglob("*.png")}
    result = export(run / "labels.csv", tmp_path / "sorted", mode=mode)
    assert result.exported == 36 and not result.skipped
    exported = _rows(result.labels_file)
    assert list(exported[0]) == ["path", "cluster", "confidence", "distance", "source"]
    for row in exported:
        target = tmp_path / "sorted" / row["path"]
        assert target.parent.name == f"cluster_{int(row['cluster']):02d}"
        assert _digest(target) == before[Path(row["source"]).relative_to(toy).as_posix()]
    left = list(toy.rglob("*.png"))
    assert len(left) == (0 if mode == "move" else 36)
    if mode == "link":
        assert all(p.is_symlink() for p in (tmp_path / "sorted").rglob("*.png"))


def test_export_never_overwrites_and_suffixes_collisions(tmp_path: Path) -> None:
    for sub in ("a", "b", "c"):
        (tmp_path / "src" / sub).mkdir(parents=True)
        (tmp_path / "src" / sub / "photo.jpg").write_bytes(sub.encode())
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "path,cluster,confidence,distance\n" + "".join(f"{s}/photo.jpg,0,1,0\n" for s in "abc")
    )
    dest = tmp_path / "out" / "cluster_00"
    dest.mkdir(parents=True)
    (dest / "photo.jpg").write_bytes(b"already here")
    result = export(labels, tmp_path / "out", root=tmp_path / "src", mode="move")
    assert result.exported == 3
    assert (dest / "photo.jpg").read_bytes() == b"already here"
    assert sorted(p.read_bytes() for p in dest.glob("photo-*.jpg")) == [b"a", b"b", b"c"]
    assert not list((tmp_path / "src").rglob("*.jpg"))
    again = export(result.labels_file, tmp_path / "out", root=tmp_path / "out", mode="copy")
    assert again.labels_file.name == "labels-1.csv"  # the first labels file is kept


@pytest.mark.parametrize("mode", ["copy", "link", "hardlink"])
def test_export_again_places_only_what_is_missing(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "src"
    for sub in ("a", "b"):  # same names, and a and b's first images have the same bytes
        (src / sub).mkdir(parents=True)
        for i in range(3):
            (src / sub / f"p{i}.png").write_bytes(f"{sub if i else ''}{i}".encode())
    rows = [f"{s}/p{i}.png,{i % 2},1,0\n" for s in "ab" for i in range(3)]
    head = "path,cluster,confidence,distance\n"
    part, full = tmp_path / "part.csv", tmp_path / "full.csv"
    part.write_text(head + "".join(rows[:2]))  # as if a first export was killed after two
    full.write_text(head + "".join(rows))
    out = tmp_path / "out"
    first = export(part, out, root=src, mode=mode)
    second = export(full, out, root=src, mode=mode)
    assert (first.already_there, second.exported, second.already_there) == (0, 6, 2)
    files = sorted(p for p in out.rglob("*.png"))
    assert len(files) == 6  # a's and b's identical p0 still get a file each
    placed = {r["source"]: out / r["path"] for r in _rows(second.labels_file)}
    assert len(set(placed.values())) == 6
    assert all(p.read_bytes() == Path(s).read_bytes() for s, p in placed.items())
    third = export(full, out, root=src, mode=mode)
    assert (third.already_there, third.labels_file) == (6, second.labels_file)
    assert sorted(p for p in out.rglob("*.png")) == files
    assert sorted(p.name for p in out.glob("labels*")) == ["labels-1.csv", "labels.csv"]


def _six_images(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    src = tmp_path / "src"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        for i in range(3):
            (src / sub / f"p{i}.png").write_bytes(f"{sub}{i}".encode())
    labels = tmp_path / "labels.csv"
    rows = [f"{s}/p{i}.png,{i % 2},1,0\n" for s in "ab" for i in range(3)]
    labels.write_text("path,cluster,confidence,distance\n" + "".join(rows))
    return src, labels, {str(p.absolute()): p.read_bytes() for p in src.rglob("*.png")}


def test_a_move_export_cut_short_finishes_on_a_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgcluster.exporting as exporting

    src, labels, before = _six_images(tmp_path)
    out, real, calls = tmp_path / "out", exporting._move, []

    def killed(source: Path, target: Path) -> None:  # two moves, then a kill in the third:
        calls.append(source)
        if len(calls) == 3:  # across file systems, copied and renamed, source not yet deleted
            target.write_bytes(source.read_bytes())
        if len(calls) >= 3:
            raise KeyboardInterrupt
        real(source, target)

    monkeypatch.setattr(exporting, "_move", killed)
    with pytest.raises(KeyboardInterrupt):
        export(labels, out, root=src, mode="move")
    monkeypatch.undo()
    assert len(list(src.rglob("*.png"))) == 4 and len(list(out.rglob("*.png"))) == 3
    with open(out / ".imgcluster-moves.jsonl", "a") as fh:
        fh.write('{"source": "/cut sh')  # a line the kill cut short is ignored
    second = export(labels, out, root=src, mode="move")
    assert (second.exported, second.already_there, second.skipped) == (6, 3, [])
    assert not list(src.rglob("*.png")) and not (out / ".imgcluster-moves.jsonl").exists()
    placed = {r["source"]: out / r["path"] for r in _rows(second.labels_file)}
    assert sorted(placed) == sorted(before) and len(list(out.rglob("*.png"))) == 6
    assert all(placed[s].read_bytes() == data for s, data in before.items())
    third = export(labels, out, root=src, mode="move")  # a finished move, run again
    assert (third.exported, third.already_there, third.skipped) == (6, 6, [])
    assert third.labels_file == second.labels_file and len(list(out.rglob("*.png"))) == 6


def test_a_move_after_a_hardlink_export_keeps_one_file_each(tmp_path: Path) -> None:
    src, labels, before = _six_images(tmp_path)
    out = tmp_path / "out"
    export(labels, out, root=src, mode="hardlink")
    moved = export(labels, out, root=src, mode="move")
    assert (moved.exported, moved.already_there, moved.skipped) == (6, 6, [])
    assert not list(src.rglob("*.png")) and len(list(out.rglob("*.png"))) == 6
    placed = {r["source"]: out / r["path"] for r in _rows(moved.labels_file)}
    assert all(placed[s].read_bytes() == data for s, data in before.items())


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_evaluating_an_export_scores_the_original_folders(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    rows = []
    for cls, clusters in (("cat", [0, 0, 0, 1]), ("dog", [1, 1, 0, 1])):
        (src / cls).mkdir(parents=True)
        for i, c in enumerate(clusters):
            (src / cls / f"{i}.png").write_bytes(f"{cls}{i}".encode())
            rows.append(f"{cls}/{i}.png,{c},1,0\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,cluster,confidence,distance\n" + "".join(rows))
    exported = export(labels, tmp_path / "sorted", root=src, fmt=fmt).labels_file
    direct = evaluate(labels, root=src)
    again = evaluate(exported)  # from any folder: the export's paths start from its own
    assert again.classes == direct.classes == ["cat", "dog"]  # not cluster_00, cluster_01
    assert (
        (again.acc, again.confusion) == (direct.acc, direct.confusion) == (0.75, [[3, 1], [1, 3]])
    )
    truth = tmp_path / "truth.csv"  # a truth CSV naming the originals matches too
    truth.write_text("path,label\n" + "".join(f"{src}/{r.split(',')[0]},x\n" for r in rows[:4]))
    assert evaluate(exported, truth=str(truth)).scored == 4


def test_export_skips_missing_sources(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("path,cluster,confidence,distance\ngone.png,0,1,0\n")
    result = export(labels, tmp_path / "out", root=tmp_path)
    assert result.exported == 0 and result.skipped[0][1] == "not found"


def test_rename_noreplace_refuses_to_overwrite(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    assert a.read_text() == "a" and b.read_text() == "b"
    rename_noreplace(a, tmp_path / "c")
    assert not a.exists() and (tmp_path / "c").read_text() == "a"


def test_copy_leaves_no_temporary_files(tmp_path: Path) -> None:
    src = tmp_path / "x.png"
    src.write_bytes(b"data")
    taken: set[Path] = set()
    first, _ = place(src, tmp_path / "dst", "copy", taken)
    second, _ = place(src, tmp_path / "dst", "copy", taken)  # one export never shares a target
    assert [p.name for p in sorted((tmp_path / "dst").iterdir())] == ["x-1.png", "x.png"]
    assert first.name == "x.png" and second.name == "x-1.png"
    assert place(src, tmp_path / "dst", "copy") == (first, True)  # a later export finds it


def test_labels_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        read_labels(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,1\n")
    with pytest.raises(UsageError, match="expected the columns"):
        read_labels(bad)
    bad.write_text("path,cluster,confidence,distance\nx.png,one,1,0\n")
    with pytest.raises(UsageError, match="row 2"):
        read_labels(bad)
    # the file's line, past a blank line and a name with a line break in it
    bad.write_text('path,cluster,confidence,distance\n\n"a\nb.png",0,1,0\nx.png,-1,1,0\n')
    with pytest.raises(UsageError, match="row 5 has a negative"):
        read_labels(bad)


def test_odd_file_names_round_trip(tmp_path: Path) -> None:
    folder = make_toy_folder(tmp_path / "toy", per_class=4)
    odd = ["with space.png", "new\nline.png", "-leading-dash.png", 'comma,quote".png']
    src = folder / "top" / "00.png"
    for name in odd:
        (folder / "top" / name).write_bytes(src.read_bytes())
    raw = b"latin1-\xe9.png"  # not valid UTF-8
    Path(os.fsdecode(os.fsencode(folder / "top") + b"/" + raw)).write_bytes(src.read_bytes())
    run = train([folder], 3, out=tmp_path / "run").run_dir
    labels = read_labels(run / "labels.csv")
    assert len(labels) == 12 + len(odd) + 1
    for name in [*odd, os.fsdecode(raw)]:
        assert f"top/{name}" in labels.paths
    result = export(run / "labels.csv", tmp_path / "sorted", mode="copy")
    assert result.exported == len(labels)
