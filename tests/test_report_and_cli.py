"""qscope discover / steer / inspect on the tiny model; the HTML report is checked structurally (and rendered in
headless Chromium when it is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from qscope_hf.cli import main

TEXTS_A = ["1 2 3 4 5 6", "42 is 6 times 7", "3.14159 2.71828", "100 200 300"]
TEXTS_B = ["the cat sat on the mat", "hello there friend", "a quiet morning walk", "blue sky above"]


class Structure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.title, self.in_title = "", False
        self.heatmaps, self.tokens, self.tables = 0, 0, []
        self.heat = []  # (activation, colour alpha) per token

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.in_title = tag == "title"
        if tag == "div" and attrs.get("class") == "text":
            self.heatmaps += 1
        if tag == "span" and attrs.get("class") == "tok":
            self.tokens += 1
            assert "background: rgba(255, 120, 0," in attrs["style"]
            alpha = float(attrs["style"].split(",")[-1].strip(" )"))
            self.heat.append((float(attrs["title"]), alpha))
        if tag == "table":
            self.tables.append(int(attrs["data-feature"]))

    def handle_data(self, data):
        if self.in_title:
            self.title += data


@pytest.fixture
def corpora(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(TEXTS_A))
    (tmp_path / "b.txt").write_text("\n".join(TEXTS_B))
    return tmp_path


def test_inspect_writes_a_self_contained_report(corpora, tokenizer):
    out = corpora / "report.html"
    main(["inspect", "--texts", str(corpora / "a.txt"), "--features", "3", "17", "--show", "2", "--out", str(out)])
    page = out.read_text()
    structure = Structure()
    structure.feed(page)
    assert structure.title.startswith("qscope inspect: tiny")
    assert structure.heatmaps == 2 * 2  # features x texts shown
    n_tokens = sum(len(tokenizer(text)["input_ids"]) for text in TEXTS_A[:2])
    assert structure.tokens == 2 * n_tokens
    assert structure.tables == [3, 17]
    assert "http" not in page  # nothing to fetch: styles inline


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("QSCOPE_REQUIRE_BROWSER"),
                    reason="headless Chromium is not installed (CI installs it and sets QSCOPE_REQUIRE_BROWSER)")
def test_report_renders_in_headless_chromium(corpora, tokenizer):
    """Chromium's own DOM of the page holds every token with its heat colour, and its screenshot shows the hottest
    token in the full heat colour (an error page or an unstyled page has neither)."""
    out = corpora / "report.html"
    main(["inspect", "--texts", str(corpora / "b.txt"), "--show", "2", "--out", str(out)])
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                f"--user-data-dir={corpora / 'profile'}"]
    dom = subprocess.run([*chromium, "--dump-dom", out.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    rendered = Structure()
    rendered.feed(dom)
    shown = len(rendered.tables)  # the strongest features, each over the two texts
    assert rendered.title.startswith("qscope inspect: tiny") and shown >= 1 and rendered.heatmaps == 2 * shown
    assert rendered.tokens == shown * sum(len(tokenizer(text)["input_ids"]) for text in TEXTS_B[:2])
    hottest = max(rendered.heat, key=lambda pair: pair[0])
    assert hottest[1] == pytest.approx(1.0, abs=1e-3)  # the strongest token gets the full colour
    shot = corpora / "shot.png"
    subprocess.run([*chromium, f"--screenshot={shot}", "--window-size=1000,800", out.as_uri()], check=True,
                   capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]  # [H, W, 3] in [0, 1]
    orange = (abs(pixels[..., 0] - 1.0) < 0.02) & (abs(pixels[..., 1] - 120 / 255) < 0.02) & (pixels[..., 2] < 0.02)
    assert orange.sum() > 20  # the hottest token's background, as painted


def test_discover_prints_the_contrast_table(corpora, capsys):
    main(["discover", "--a", str(corpora / "a.txt"), "--b", str(corpora / "b.txt"), "--top", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| layer | feature | rate A | rate B |")
    assert len(lines) == 2 + 4 + 2  # header, four rows, a blank line and the advice to calibrate
    assert all(line.startswith("| 1 |") and line.endswith(("| + |", "| − |")) for line in lines[2:6])
    assert lines[-1].startswith("strength: calibrate it on the model")


def test_discover_by_output_effect(corpora, capsys):
    main(["discover", "--a", str(corpora / "a.txt"), "--b", str(corpora / "b.txt"), "--by", "both", "--pool", "20",
          "--top", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| layer | feature | input (rate A − B) | output score | logit lens |"
    rows = [line.split(" | ") for line in lines[2:]]
    assert 1 <= len(rows) <= 3
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)  # fire more on A, and raise A's vocabulary
    assert [float(r[3]) for r in rows] == sorted((float(r[3]) for r in rows), reverse=True)


def test_steer_with_a_calibrated_strength(capsys):
    main(["steer", "--prompt", "Hello", "--feature", "5", "--auto-strength", "--max-ce-increase", "0.01",
          "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert out.startswith("calibrated strength ") and "budget 0.01" in out
    assert out.index("--- unsteered") < out.index("--- steered")


def test_steer_prints_the_generation_a_hand_hook_gives(capsys):
    """The steered text is what greedy decoding gives with 40 × feature 5's decoder direction added to layer 1's
    output at every position (a plain forward hook, written here), and it differs from the unsteered text."""
    import torch

    from qscope_hf.loading import load_model, load_sae

    main(["steer", "--prompt", "Hello", "--feature", "5", "--strength", "40", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    unsteered = out.split("--- unsteered\n")[1].split("--- steered\n")[0].rstrip("\n")
    steered = out.split("--- steered\n")[1].rstrip("\n")
    model, tokenizer = load_model("tiny")
    sae = load_sae("tiny", 1, model=model)
    direction = sae.W_dec[:, 5].detach()
    inputs = tokenizer(["Hello"], return_tensors="pt")
    handle = model.model.layers[1].register_forward_hook(
        lambda module, args, output: (output[0] + 40 * direction, *output[1:]) if isinstance(output, tuple)
        else output + 40 * direction)
    try:
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    finally:
        handle.remove()
    assert steered == tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert steered != unsteered


def test_corpus_errors(corpora, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--texts", str(corpora / "missing.txt")])
    assert exit_.value.code == 1 and "no corpus at" in capsys.readouterr().err
    (corpora / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SystemExit):
        main(["inspect", "--texts", str(corpora / "c.jsonl")])
    assert "no text column 'text'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no corpus at"):  # --debug: the exception itself
        main(["--debug", "inspect", "--texts", str(corpora / "missing.txt")])


def test_export_writes_a_control_vector_and_refuses_an_architecture_without_mlp_bias(tmp_path, capsys):
    from qscope_hf.export import import_control_vector

    main(["export", "--feature", "3", "5", "--strength", "2", "-1", "--out", str(tmp_path / "v.gguf")])
    assert "wrote" in capsys.readouterr().out
    [spec] = import_control_vector(tmp_path / "v.gguf")
    assert spec.layer == 1 and spec.vector.shape == (64,)
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--feature", "3", "--strength", "2", "--bake", str(tmp_path / "baked")])
    assert exit_.value.code == 1 and "no MLP bias" in capsys.readouterr().err
