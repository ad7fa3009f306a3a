"""report.html: one self-contained file (every image an embedded data URI that decodes, no external URL), in the run
folder and beside a labelled-folder inference."""

import base64
import html
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import inference

pytestmark = pytest.mark.slow  # needs the trained tiny run


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.headings, self._in_h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2 and data.strip():
            self.headings.append(data.strip())

    def handle_endtag(self, tag):
        self._in_h2 = False


def _check(path):
    text = path.read_text(encoding="utf-8")
    collector = _Collector()
    collector.feed(text)
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    assert not collector.links
    for src in collector.images:
        assert src.startswith("data:image/"), src[:40]
        payload = base64.b64decode(src.split(",", 1)[1])
        Image.open(io.BytesIO(payload)).verify()
    return collector


def test_run_folder_report_is_self_contained(tiny_run):
    collector = _check(tiny_run / "report.html")
    for heading in ("Data", "Headline metrics", "Figures", "Operating points and abstention", "Subgroups",
                    "Most confident errors", "Least confident correct answers"):
        assert heading in collector.headings
    assert len(collector.images) >= 5 + 1  # the figures and at least one gallery card


def test_labelled_folder_report_uses_the_gradcam_overlays(tiny_run, lesion_dataset, tmp_path):
    out = tmp_path / "scored"
    inference.main(inference.parse_args(
        ["--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset"), "--inference_output",
         str(out), "--labels_from_folders", "--generate_gradcam", "--num_workers", "0"]))
    collector = _check(out / "report.html")
    assert "Most confident errors" in collector.headings and len(collector.images) >= 6


def test_gallery_cards_show_the_answer_the_run_delivered(tiny_run):
    """Each card's class and probability are test_predictions.csv's (flip TTA and temperature included), and its
    overlay explains that class: a card must never contradict the predictions file beside it."""
    delivered = pd.read_csv(tiny_run / "test_predictions.csv")
    prob_columns = [c for c in delivered.columns if c.startswith("prob_")]
    by_name = {Path(path).name: row for path, row in zip(delivered["filepath"], delivered[prob_columns].to_numpy())}
    text = (tiny_run / "report.html").read_text(encoding="utf-8")
    cards = re.findall(r'<div class="card"><img [^>]*alt="([^"]*)">[^<]*<br>(.*?)</div>', text, flags=re.S)
    assert cards, "the gallery is empty"
    for name, body in cards:
        probs = by_name[html.unescape(name)]
        assert re.search(r"\(([0-9.]+)\)", body)[1] == f"{probs.max():.2f}", (name, body)
        shown = re.findall(r"<b[^>]*>([^<]*)</b>", body)[-1]  # errors: the predicted class; correct: the true one
        assert html.unescape(shown) == prob_columns[int(probs.argmax())][len("prob_"):], (name, body)
    overlays = sorted((tiny_run / "report_gallery").rglob("*.jpg"))
    assert overlays
    for overlay in overlays:
        stem, predicted = overlay.stem.rsplit("_pred-", 1)
        row = next(probs for file, probs in by_name.items() if Path(file).stem == stem.rsplit("_true-", 1)[0])
        assert predicted == prob_columns[int(row.argmax())][len("prob_"):]
