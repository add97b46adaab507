"""Interactive panels, with a static rendering where no widget front end runs (the book).

:func:`decoding_panel` shows a model's next-token distribution before and after the decoding
processors, with sliders for temperature, top-k, top-p and min-p; every change redraws the
filtered distribution and draws fresh samples. In a static page (the book build, which sets
``ARCOURSE_PROGRESS=off``, or with ``ARCOURSE_WIDGETS=static``) the same function draws a static
figure of a few preset settings instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["live_widgets", "char_label", "plot_filtered", "decoding_panel", "DecodingPanel",
           "PRESETS"]

PRESETS = (
    {"temperature": 1.0},
    {"temperature": 0.5},
    {"temperature": 1.0, "top_k": 5},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 0.0},
)


def live_widgets() -> bool:
    """Whether to show live ipywidgets: inside a Jupyter kernel, unless a static page is built.

    ``ARCOURSE_WIDGETS=static`` (or ``off``), or ``ARCOURSE_PROGRESS=off`` (set by the book
    build), asks for the static rendering; ``ARCOURSE_WIDGETS=live`` forces the widgets.
    """
    mode = os.environ.get("ARCOURSE_WIDGETS", "auto").strip().lower()
    if mode in {"static", "off", "0", "false"}:
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    if mode in {"live", "on", "1", "true"}:
        return True
    if os.environ.get("ARCOURSE_PROGRESS", "auto") == "off":
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def char_label(c: str) -> str:
    """A printable label for a character: space, newline and tab made visible."""
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(c, c)


def _settings_label(s: dict) -> str:
    t = s.get("temperature", 1.0)
    parts = ["greedy" if t == 0 else f"T={t:g}"]
    for k, name in (("top_k", "k"), ("top_p", "p"), ("min_p", "min-p"),
                    ("repetition_penalty", "rep")):
        if s.get(k) is not None:
            parts.append(f"{name}={s[k]:g}")
    return ", ".join(parts)


def _clean(settings: dict) -> dict:
    """Slider values to decoding settings: k=0, p=1 and min-p=0 mean off."""
    s = dict(settings)
    if s.get("top_k") in (0, None):
        s["top_k"] = None
    if s.get("top_p") is not None and s["top_p"] >= 1.0:
        s["top_p"] = None
    if s.get("min_p") in (0, 0.0):
        s["min_p"] = None
    return s


def plot_filtered(logits, chars: str, settings: dict, *, ax=None, show_top: int = 25):
    """Bars of the next-token distribution: the model's (light) and the filtered one (dark).

    ``logits`` (V,), ``chars`` the vocabulary (one character per id). The ``show_top`` most
    likely tokens under the model are shown, most likely first.
    """
    import matplotlib.pyplot as plt

    from arcourse.decoding import filtered_probs

    logits = np.asarray(logits, np.float32).reshape(-1)
    if len(chars) != logits.shape[0]:
        raise ValueError(f"chars must have one character per logit: {len(chars)} != "
                         f"{logits.shape[0]}")
    ax = ax or plt.gca()
    p = np.exp(logits - logits.max())
    p /= p.sum()
    q = np.asarray(filtered_probs(logits, **_clean(settings)))
    top = np.argsort(-p, kind="stable")[:show_top]
    x = np.arange(len(top))
    ax.bar(x, p[top], color="0.8", label="model")
    ax.bar(x, q[top], width=0.5, color="C0", label="filtered")
    ax.set_xticks(x, [char_label(chars[i]) for i in top], fontsize=8)
    kept = int((q > 0).sum())
    ax.set_title(f"{_settings_label(_clean(settings))}: {kept} token(s) kept", fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("probability")
    return ax


class DecodingPanel:
    """The live panel: four sliders, the filtered distribution and fresh samples.

    ``sample_fn(settings, seed) -> list[str]`` draws samples with the decoding settings.
    """

    def __init__(self, logits, chars: str, sample_fn: Callable[[dict, int], Sequence[str]]
                 | None = None, *, prompt: str = "", show_top: int = 25):
        import ipywidgets as w

        self.logits, self.chars, self.sample_fn = logits, chars, sample_fn
        self.prompt, self.show_top, self.seed = prompt, show_top, 0
        style = {"description_width": "90px"}
        self.temperature = w.FloatSlider(1.0, min=0.0, max=2.0, step=0.05,
                                         description="temperature", style=style)
        self.top_k = w.IntSlider(0, min=0, max=len(chars), description="top-k (0=off)",
                                 style=style)
        self.top_p = w.FloatSlider(1.0, min=0.05, max=1.0, step=0.01, description="top-p",
                                   style=style)
        self.min_p = w.FloatSlider(0.0, min=0.0, max=0.5, step=0.01, description="min-p",
                                   style=style)
        self.plot_out = w.Output()
        self.text_out = w.Output(layout={"border": "1px solid #ccc", "padding": "4px"})
        self.redraws = 0
        for s in self.sliders:
            s.observe(self._changed, names="value")
        self.widget = w.VBox([w.HBox([w.VBox(self.sliders[:2]), w.VBox(self.sliders[2:])]),
                              self.plot_out, self.text_out])
        self.redraw()

    @property
    def sliders(self):
        return [self.temperature, self.top_k, self.top_p, self.min_p]

    @property
    def settings(self) -> dict:
        return _clean({"temperature": self.temperature.value, "top_k": self.top_k.value,
                       "top_p": self.top_p.value, "min_p": self.min_p.value})

    def _changed(self, _change):
        self.redraw()

    def redraw(self):
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.redraws += 1
        self.seed += 1
        with self.plot_out:
            self.plot_out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(9, 2.6))
            plot_filtered(self.logits, self.chars, self.settings, ax=ax, show_top=self.show_top)
            ax.legend(fontsize=8)
            fig.tight_layout()
            display(fig)
            plt.close(fig)
        if self.sample_fn is not None:
            self.samples = list(self.sample_fn(self.settings, self.seed))
            with self.text_out:
                self.text_out.clear_output(wait=True)
                for s in self.samples:
                    print(repr(self.prompt + s)[1:-1][:160])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def decoding_panel(logits, chars: str, sample_fn=None, *, prompt: str = "", show_top: int = 25,
                   presets: Sequence[dict] = PRESETS, live: bool | None = None):
    """Show the decoding panel: live sliders in Jupyter, a static figure of ``presets`` otherwise.

    Displays itself and returns the :class:`DecodingPanel` (live) or the figure (static). In
    the static rendering, one sample per preset (seed 0) is printed under the figure.
    """
    if live is None:
        live = live_widgets()
    import matplotlib.pyplot as plt
    from IPython.display import display

    if live:
        panel = DecodingPanel(logits, chars, sample_fn, prompt=prompt, show_top=show_top)
        display(panel.widget)
        return panel

    cols = 3
    rows = -(-len(presets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax, s in zip(axes.ravel(), presets):
        plot_filtered(logits, chars, s, ax=ax, show_top=min(show_top, 15))
    for ax in axes.ravel()[len(presets):]:
        ax.axis("off")
    fig.suptitle(f"next character after {prompt[-40:]!r}: model (grey) and filtered (blue)",
                 fontsize=10)
    fig.tight_layout()
    plt.show()
    if sample_fn is not None:
        for s in presets:
            text = list(sample_fn(_clean(s), 0))[0]
            print(f"{_settings_label(_clean(s)):>16}: {repr(text)[1:-1][:100]}")
    return fig
