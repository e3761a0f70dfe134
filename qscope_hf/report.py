"""Self-contained HTML reports: per-token activation heatmaps of chosen features, their top contexts, and images.

Everything (styles, PNG plots as data URIs) is inline, so a report is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .discovery import FeatureStats

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.text { font-family: ui-monospace, monospace; line-height: 1.9; margin: .3em 0 1em; }
.tok { padding: 1px 0; border-radius: 2px; white-space: pre-wrap; }
table { border-collapse: collapse; margin: .5em 0 1em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; font-size: .9em; text-align: left; }
.ctx { font-family: ui-monospace, monospace; } .hit { background: #ffb347; font-weight: bold; }
.label { color: #666; font-size: .85em; }
"""


@dataclass
class TextActivations:
    """One text's tokens and the activations ``[T, S]`` of the report's features on them."""

    tokens: list[str]
    activations: Tensor


@dataclass
class Report:
    """An HTML report under construction: heatmaps, top-context tables and images, in the order added."""

    title: str
    parts: list[str] = field(default_factory=list)

    def heatmap(self, features: Sequence[int], texts: Sequence[TextActivations], *, layer: int | None = None) -> None:
        """One coloured line per (text, feature): each token shaded by the feature's activation on it."""
        where = f" at layer {layer}" if layer is not None else ""
        self.parts.append(f"<h2>Per-token activations{where}</h2>")
        for column, feature in enumerate(features):
            peak = max(float(t.activations[:, column].max()) for t in texts) or 1.0
            self.parts.append(f"<h3>feature {feature} <span class='label'>(max {peak:.3f})</span></h3>")
            for text in texts:
                spans = []
                for token, value in zip(text.tokens, text.activations[:, column].tolist()):
                    alpha = max(0.0, value) / peak
                    spans.append(f"<span class='tok' title='{value:.3f}' style='background: rgba(255, 120, 0, "
                                 f"{alpha:.3f})'>{html.escape(token)}</span>")
                self.parts.append(f"<div class='text' data-feature='{feature}'>{''.join(spans)}</div>")

    def top_contexts(self, stats: FeatureStats, features: Sequence[int], *, window: int = 8) -> None:
        """A table per feature of its top-activating contexts from ``stats``."""
        self.parts.append(f"<h2>Top contexts (layer {stats.layer}, {stats.tokens} tokens)</h2>")
        for feature in features:
            rate = float(stats.rate[feature])
            self.parts.append(f"<h3>feature {feature} <span class='label'>fires on {100 * rate:.2f}% of tokens, "
                              f"max {float(stats.act_max[feature]):.3f}</span></h3>")
            rows = "".join(
                f"<tr><td>{c.value:.3f}</td><td class='ctx'>{html.escape(c.left)}<span class='hit'>"
                f"{html.escape(c.token)}</span>{html.escape(c.right)}</td></tr>"
                for c in stats.top_contexts(feature, window=window))
            self.parts.append(f"<table data-feature='{feature}'><tr><th>activation</th><th>context</th></tr>"
                              f"{rows}</table>")

    def image(self, png: str | Path, caption: str) -> None:
        """Embed a PNG file as a data URI."""
        data = base64.b64encode(Path(png).read_bytes()).decode()
        self.parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def html(self) -> str:
        """The report as one self-contained HTML page (plots embedded)."""
        body = "\n".join(self.parts)
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n")

    def save(self, path: str | Path) -> Path:
        """Write :meth:`html` to ``path`` (UTF-8); returns the path."""
        path = Path(path)
        path.write_text(self.html(), encoding="utf-8")
        return path


def token_activations(tokenizer, hidden: Tensor, input_ids: Tensor, sae, features: Sequence[int]) -> TextActivations:
    """Tokens of one text and the SAE activations (top-k codes, zero when not selected) of ``features`` on its
    hidden states ``[T, d]``."""
    index = sae.feature_index(features)
    with torch.no_grad():
        acts = sae.encode(hidden.to(sae.device, sae.dtype))[:, index].float().cpu()
    return TextActivations([tokenizer.decode([int(i)]) for i in input_ids], acts)
