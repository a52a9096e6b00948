"""finetune/report/page.py: ``samtune report`` on a tiny trained run (real training, 4 steps): the page
is parsed with the standard library's HTML parser and checked against metrics.json."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from PIL import Image
from samtune.datasets.source import LabelSpace
from samtune.finetune.report import figures as F
from samtune.finetune.cli import main
from samtune.finetune.report.page import SECTIONS, num

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG_PREFIX = "data:image/png;base64,"


class Page(HTMLParser):
    """What the tests read from a report: headings, tables (rows of cell texts), images, notes,
    and every src/href attribute."""

    def __init__(self, text: str):
        super().__init__()
        self.headings: list[tuple[str, str]] = []  # (tag, text)
        self.tables: list[dict] = []  # {"attrs", "rows": [(tr attrs, [cell texts])]}
        self.images: list[dict] = []
        self.notes: list[str] = []
        self.captions: list[str] = []
        self._kind: str | None = None
        self.links: list[str] = []
        self._text: list[str] | None = None
        self._capture: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag in ("h1", "h2", "h3", "h4") or (tag == "p" and attrs.get("class") in ("note", "caption")):
            self._capture, self._text, self._kind = tag, [], attrs.get("class")
        elif tag == "table":
            self.tables.append({"attrs": attrs, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append((attrs, []))
        elif tag in ("td", "th"):
            self._capture, self._text = tag, []
        elif tag == "img":
            self.images.append(attrs)

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag != self._capture:
            return
        text = "".join(self._text).strip()
        if tag in ("td", "th"):
            self.tables[-1]["rows"][-1][1].append(text)
        elif tag == "p":
            (self.notes if self._kind == "note" else self.captions).append(text)
        else:
            self.headings.append((tag, text))
        self._capture = self._text = None

    def table(self, cls: str, **attrs) -> dict:
        found = [t for t in self.tables if t["attrs"].get("class") == cls and all(t["attrs"].get(k) == v for k, v in attrs.items())]
        assert len(found) == 1, (cls, attrs, [t["attrs"] for t in self.tables])
        return found[0]


@pytest.fixture(scope="module")
def trained(both_task_run):
    """A 2-step task-both run with one corrective round on 2 validation cases (so best and worst differ)."""
    return both_task_run


@pytest.fixture(scope="module")
def page(trained):
    _, run = trained
    out = run.parent / "one.html"
    assert main(["-q", "report", str(run), "--out", str(out), "--cases", "2", "--max-samples", "24", "--device", "cpu"]) == 0
    return out.read_text(), json.loads((run / "metrics.json").read_text())


def test_every_section_heading_is_there(page):
    parsed = Page(page[0])
    assert parsed.headings[0] == ("h1", "samtune report: run")
    assert [t for tag, t in parsed.headings if tag == "h3"] == list(SECTIONS)
    assert {t for tag, t in parsed.headings if tag == "h4"} >= {"prompted", "semantic"}


@pytest.mark.parametrize("part", ["prompted", "semantic"])
def test_per_class_table_holds_the_numbers_of_metrics_json(page, part):
    html, metrics = page
    rows = Page(html).table("per-class", **{"data-part": part})["rows"]
    header, body, mean = rows[0][1], rows[1:-1], rows[-1][1]
    after, before, volume = metrics[part]["per_class"], metrics["baseline"][part]["per_class"], metrics[part].get("volume")
    assert (volume is not None) == (part == "semantic")  # prompted: eval.max_samples scores a subset, no whole volumes
    assert [attrs["data-class"] for attrs, _ in body] == list(after)  # one row per class, in metrics.json's order
    col = {name: i for i, name in enumerate(header)}
    for (_, cells), (name, values) in zip(body, after.items()):
        assert cells[0] == name
        assert cells[col["IoU after"]] == num(values["iou"]) and cells[col["Dice after"]] == num(values["dice"])
        assert cells[col["IoU before"]] == num(before[name]["iou"]) and cells[col["Dice before"]] == num(before[name]["dice"])
        if volume:
            assert cells[col["3D Dice"]] == num(volume["per_class"][name]["dice"]) and cells[col["HD95 mm"]] == num(volume["per_class"][name]["hd95_mm"], 1)
    assert mean[0] == "mean" and mean[col["IoU after"]] == f"{metrics[part]['miou']:.3f}" and mean[col["IoU before"]] == num(metrics["baseline"][part]["miou"])
    if volume:
        assert mean[col["NSD"]] == num(volume["mnsd"])
    else:
        assert "3D Dice" not in col and mean[col["samples"]] == num(metrics[part]["n_samples"])
    assert num(0.12345) == "0.123" and num(math.nan) == "—"


def test_images_are_embedded_pngs_with_content(page):
    images = Page(page[0]).images
    alts = [i["alt"] for i in images]
    # bars of both parts, learning curves, the curve by round, best and worst cases
    assert alts == ["prompted: per-class IoU and Dice", "semantic: per-class IoU and Dice", "learning curves", "mIoU and mDice by round", "best cases", "worst cases"]
    for image in images:
        assert image["src"].startswith(PNG_PREFIX)
        data = base64.b64decode(image["src"][len(PNG_PREFIX):], validate=True)
        assert len(data) > 5_000
        picture = Image.open(io.BytesIO(data))
        assert picture.format == "PNG" and picture.width >= 400 and picture.height >= 150
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 20, image["alt"]  # not a blank or single-colour picture
        assert max(count for count, _ in colours) < 0.97 * picture.width * picture.height


def test_nothing_is_fetched_from_a_network(page):
    html = page[0]
    links = Page(html).links
    assert links and all(link.startswith(PNG_PREFIX) or link.startswith("#") for link in links)
    assert not re.search(r"https?://|url\(|@import|<script|<link", html, re.IGNORECASE)


def test_montage_text_names_the_checkpoint_and_the_cases(page, trained):
    html, _ = page
    assert str(trained[1].resolve() / "checkpoints" / "best") in html
    captions = [n for n in Page(html).captions]
    assert [c.split(":")[0] for c in captions] == ["Best 1 case", "Worst 1 case"]  # 2 validation cases: one each
    assert all("phantom_" in c and "mean Dice" in c for c in captions)
    assert "on 12 of the 12 validation samples of the prompted evaluation" in html


@pytest.fixture
def stub_charts(monkeypatch):
    """Charts replaced by one small PNG where a test reads tables and notes (each chart costs ~0.5 s)."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(buffer, format="PNG")
    for name in ("class_bars", "learning_curves", "rounds_curve"):
        monkeypatch.setattr(F, name, lambda *args, png=buffer.getvalue(): png)


def test_comparison_table_with_two_runs(trained, tmp_path, stub_charts):
    _, run = trained
    other = tmp_path / "other_run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("states", "tensorboard", "report.html"))
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["semantic"]["miou"], metrics["semantic"]["per_class"]["liver"]["iou"] = 0.4321, 0.9876
    metrics["skipped_cases"] = [{"case": "phantom_009", "file": "/data/phantom_009_0000.nii.gz", "problem": "NaN <voxels>"}]
    metrics["stopped_early"] = {"step": 2, "patience": 1, "best_step": 2}
    (other / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "both.html"
    assert main(["-q", "report", str(run), str(other), "--out", str(out), "--cases", "0"]) == 0
    parsed = Page(out.read_text())
    header, *rows = parsed.table("comparison")["rows"]
    assert [attrs["data-run"] for attrs, _ in rows] == ["run", "other_run"]
    col = {name: i for i, name in enumerate(header[1])}
    assert rows[1][1][col["mIoU"]] == "0.432" and rows[1][1][col["IoU liver"]] == "0.988"
    assert rows[0][1][col["mIoU"]] == num(json.loads((run / "metrics.json").read_text())["semantic"]["miou"])
    assert [t for tag, t in parsed.headings if tag == "h2"] == ["Comparison", "Run 1: run", "Run 2: other_run"]
    assert [t for tag, t in parsed.headings if tag == "h3"] == list(SECTIONS) * 2
    assert parsed.notes.count("No montage: --cases 0.") == 2
    assert parsed.table("skipped")["rows"][1:] == [({}, ["phantom_009", "/data/phantom_009_0000.nii.gz", "NaN <voxels>"])]  # escaped, read back
    assert "stopped early" in out.read_text() and "step 2, patience 1, best_step 2" in out.read_text()


def test_instance_ap_and_per_condition_tables(trained, tmp_path, stub_charts):
    """A part's ``instances`` (Cityscapes AP) and ``by_condition`` (ACDC) are tables of their own,
    the instance protocol beside them."""
    _, run = trained
    other = tmp_path / "driving"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("states", "tensorboard", "report.html"))
    metrics = json.loads((other / "metrics.json").read_text())
    part = metrics["semantic"]
    part["instances"] = {"ap": 0.25, "ap50": 0.5, "images": 3, "protocol": {"benchmark": "Cityscapes instance-level <test>"},
                         "per_class": {"car": {"ap": 0.25, "ap50": 0.5, "instances": 7, "predictions": 4},
                                       "rider": {"ap": math.nan, "ap50": math.nan, "instances": 0, "predictions": 0}}}  # fmt: skip
    names = list(part["per_class"])
    part["by_condition"] = {c: {"miou": m, "mdice": m + 0.1, "per_class": {n: {"iou": m} for n in names}} for c, m in (("fog", 0.3), ("night", 0.1))}
    (other / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "driving.html"
    assert main(["-q", "report", str(other), "--out", str(out), "--cases", "0"]) == 0
    parsed = Page(out.read_text())
    rows = parsed.table("instances")["rows"]
    assert [cells for _, cells in rows] == [["class", "AP", "AP50", "instances", "predictions"], ["car", "0.250", "0.500", "7", "4"],
                                            ["rider", "—", "—", "0", "0"], ["mean", "0.250", "0.500", "", ""]]  # fmt: skip
    assert "Cityscapes instance-level &lt;test&gt;" in out.read_text()  # the protocol, escaped
    header, *groups = parsed.table("by-group")["rows"]
    assert header[1][:3] == ["condition", "mIoU", "mDice"] and [a["data-condition"] for a, _ in groups] == ["fog", "night"]
    assert groups[1][1][:4] == ["night", "0.100", "0.200", "0.100"]


def test_missing_checkpoint_or_data_leaves_a_note_not_a_traceback(trained, tmp_path, capsys, stub_charts):
    _, run = trained
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(run, no_ckpt, ignore=shutil.ignore_patterns("states", "tensorboard", "checkpoints"))
    metrics = json.loads((no_ckpt / "metrics.json").read_text())
    metrics["checkpoint"] = str(tmp_path / "gone")
    (no_ckpt / "metrics.json").write_text(json.dumps(metrics))
    no_data = tmp_path / "no_data"
    shutil.copytree(run, no_data, ignore=shutil.ignore_patterns("states", "tensorboard"))
    saved = no_data / "checkpoints" / "best" / "recipe.yaml"
    saved.write_text(saved.read_text().replace(str(run.parent / "data"), str(tmp_path / "moved")))
    out = tmp_path / "r.html"
    assert main(["-q", "report", str(no_ckpt), str(no_data), "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    parsed = Page(out.read_text())
    notes = [n for n in parsed.notes if n.startswith("No montage")]
    assert len(notes) == 2 and "no checkpoint to predict with" in notes[0] and "data.root=" in notes[1] and "moved" in notes[1]
    assert len([t for t in parsed.tables if t["attrs"].get("class") == "per-class"]) == 4  # the numbers are all there
    assert not (tmp_path / "moved").exists()  # data.generate_demo never runs from a report


def test_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "empty") in err and "no metrics.json" in err and "Traceback" not in err
    (tmp_path / "empty" / "metrics.json").write_text('{"step": 3}')
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json" in err and "'prompted' or 'semantic'" in err
    assert not (tmp_path / "empty" / "report.html").exists()


def test_evaluate_writes_the_report_beside_its_metrics(trained, tmp_path, stub_charts):
    recipe, run = trained
    out = tmp_path / "eval" / "metrics.json"
    assert main(["-q", "evaluate", str(recipe), "--checkpoint", str(run / "checkpoints" / "best"), "--out", str(out), "eval.max_samples=6"]) == 0
    parsed = Page((out.parent / "report.html").read_text())
    assert any("No 'baseline'" in n for n in parsed.notes) and any("No 'history'" in n for n in parsed.notes)
    assert [i["alt"] for i in parsed.images][-2:] == ["best cases", "worst cases"]
    assert "max_samples: 6" in (out.parent / "report.html").read_text()  # the recipe evaluate ran, overrides included


def test_semantic_montage_of_an_automatic_run(trained, make_run, tmp_path, stub_charts):
    """task: automatic has no prompts: the montage comes from the class prompts' label maps."""
    _, run = trained
    data = yaml.safe_load((run / "recipe.yaml").read_text())["data"]
    space = LabelSpace([1, 2, 3, 4], ["liver", "spleen", "kidney_right", "kidney_left"])
    auto = make_run(tmp_path, data, space, task="automatic")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("prompted")
    metrics.update(task="automatic", headline="semantic")
    (auto / "metrics.json").write_text(json.dumps(metrics))
    assert main(["-q", "report", str(auto), "--cases", "1", "--max-samples", "8", "--device", "cpu"]) == 0
    html = (auto / "report.html").read_text()
    assert "8 of the 24 validation samples of the semantic evaluation" in html and "This task has no prompted part" in html
    alts = [i["alt"] for i in Page(html).images]
    assert alts[-2:] == ["best cases", "worst cases"]


def test_best_and_worst_never_overlap_and_skip_unscored_units():
    def unit(name, tp, fp, fn):
        u = F.Unit(name)
        u.add("c", tp, fp, fn)
        return u

    units = {u.name: u for u in [unit("a", 9, 1, 0), unit("b", 1, 5, 4), unit("c", 5, 5, 0), unit("empty", 0, 0, 0)]}
    assert units["a"].score == pytest.approx(18 / 19) and math.isnan(units["empty"].score)
    best, worst = F.best_and_worst(units, 2)
    assert [u.name for u in best] == ["a", "c"] and [u.name for u in worst] == ["b"]
    assert F.spread(5, 64) == [0, 1, 2, 3, 4] and F.spread(100, 3) == [0, 50, 99] and F.spread(0, 3) == []
    shown = F.Shown(0, "x", 3, (2, 3), F._pack(np.eye(2, 3, dtype=bool), np.ones((2, 3), bool)))
    truth, pred = shown.maps()
    assert truth.tolist() == [[1, 0, 0], [0, 1, 0]] and pred.all()


def test_report_after_training_warns_instead_of_failing(trained, tmp_path, caplog, stub_charts):
    """The call at the end of training: a report that cannot be written never fails a finished run."""
    from samtune.finetune.report.page import report_after_run

    assert report_after_run(tmp_path, "cpu") is None
    assert "report.html was not written" in caplog.text and "no metrics.json" in caplog.text
    run = tmp_path / "copy"
    shutil.copytree(trained[1], run, ignore=shutil.ignore_patterns("states", "tensorboard", "report.html"))
    assert report_after_run(run, "cpu") == run / "report.html" and (run / "report.html").is_file()
