"""report.html: one self-contained file (every image an embedded data URI that decodes, no external URL), in the run
folder and beside a labelled-folder inference."""

import base64
import io
from html.parser import HTMLParser

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
