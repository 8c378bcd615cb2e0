"""``gradtrace demo``: the chapter's experiments, run, diagnosed and compared.

Four groups of seeded CPU runs on synthetic data, each written as a trace directory:

1. depth: a deep sigmoid network whose early layers stop learning, versus the same depth
   with ReLU + Kaiming initialisation, versus residual blocks with LayerNorm;
2. recurrent: a ReLU RNN whose gradients explode (with and without norm clipping), a
   tanh RNN whose gradients vanish through time, an LSTM and a GRU on the same task;
3. dead units: a ReLU network under a too-high peak learning rate, versus Leaky ReLU,
   GELU and a lower rate;
4. the chapter's numbers (sigmoid' ≤ 0.25, 0.5^20, 1.5^50) measured with torch.

Each run's findings are printed with their fixes; ``OUT/report.html`` compares the runs.

Example (about a minute, so in prose): ``run_demo("gradtrace-demo", quick=True)`` trains
every run, prints the findings and returns ``PosixPath('gradtrace-demo/report.html')``.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .experiments import FULL, QUICK, TINY, DemoConfig, train_mlp, train_relu, train_rnn

__all__ = ["run_demo", "measure_facts", "EXPERIMENTS", "DemoConfig", "QUICK", "FULL", "TINY"]

#: (group id, title, explanation, charts, [(run name, label, trainer, note)])
EXPERIMENTS: list[tuple[str, str, str, tuple[str, ...], list[tuple[str, str, Callable, str]]]] = [
    ("depth", "Depth: sigmoid vs ReLU + Kaiming vs residual + LayerNorm",
     "Three networks of the same depth on the same task and optimizer. Through sigmoid layers "
     "each backward step multiplies the gradient by at most 0.25, so the input-side layers "
     "receive almost nothing; ReLU with Kaiming initialisation keeps the scale, and the "
     "residual path carries the gradient past every block.",
     ("flow", "loss"),
     [("sigmoid", "Deep sigmoid (PyTorch default init)", lambda o, c, t: train_mlp(o, "sigmoid", c, t),
       "Early layers stop learning."),
      ("relu_kaiming", "ReLU + Kaiming init", lambda o, c, t: train_mlp(o, "relu_kaiming", c, t),
       "Same depth; kaiming_normal_(nonlinearity='relu'), zero biases."),
      ("residual_layernorm", "Residual blocks + LayerNorm", lambda o, c, t: train_mlp(o, "residual_layernorm", c, t),
       "x + Linear(GELU(Linear(LayerNorm(x)))) per block.")]),
    ("rnn-explode", "Recurrent: exploding gradients, with and without norm clipping",
     "A ReLU RNN whose recurrent matrix has every singular value 1.6 reads a long sequence; the "
     "backward signal grows with each time step, the first step overflows and the weights turn "
     "to nan. The same run with clip_grad_norm_(max_norm=1.0) trains.",
     ("total", "loss", "time"),
     [("rnn_exploding", "ReLU RNN, no clipping", lambda o, c, t: train_rnn(o, "rnn_exploding", c, t),
       "Recurrent radius 1.6, SGD lr 0.01."),
      ("rnn_clipped", "Same RNN + clip_grad_norm_(1.0)", lambda o, c, t: train_rnn(o, "rnn_clipped", c, t),
       "Identical run, gradients clipped to total norm 1 before each step.")]),
    ("rnn-vanish", "Recurrent: vanishing through time; LSTM and GRU on the same task",
     "The target depends on the first three inputs only, so its gradient must travel the whole "
     "sequence back. With small recurrent weights (radius 0.5) a tanh RNN's gradient at the "
     "first steps is 0.5^T of the last; gated cells carry it further.",
     ("time", "loss"),
     [("rnn_vanishing", "tanh RNN, recurrent radius 0.5", lambda o, c, t: train_rnn(o, "rnn_vanishing", c, t),
       "Adam lr 0.01; watched with time_gradients=True."),
      ("lstm", "LSTM", lambda o, c, t: train_rnn(o, "lstm", c, t), "PyTorch default init, Adam lr 0.01."),
      ("gru", "GRU", lambda o, c, t: train_rnn(o, "gru", c, t), "PyTorch default init, Adam lr 0.01.")]),
    ("dead-relu", "Dead units: ReLU under a too-high learning rate vs Leaky ReLU, GELU, a lower rate",
     "A large step pushes many ReLU pre-activations below zero for every input; those units "
     "output 0, receive 0 gradient and never recover. Leaky ReLU and GELU keep a gradient for "
     "negative inputs; a lower rate avoids the push. All four use SGD with momentum 0.9 and a "
     "cosine decay from the peak rate.",
     ("loss", "flow"),
     [("relu_high_lr", "ReLU, peak lr 0.4", lambda o, c, t: train_relu(o, "relu_high_lr", c, t),
       "SGD momentum 0.9, cosine decay, 4 layers of 128."),
      ("leaky_high_lr", "Leaky ReLU (0.01), peak lr 0.4", lambda o, c, t: train_relu(o, "leaky_high_lr", c, t), ""),
      ("gelu_high_lr", "GELU, peak lr 0.4", lambda o, c, t: train_relu(o, "gelu_high_lr", c, t), ""),
      ("relu_low_lr", "ReLU, peak lr 0.2", lambda o, c, t: train_relu(o, "relu_low_lr", c, t), "")]),
]


def measure_facts() -> list[dict[str, str]]:
    """The chapter's small numerical facts, computed with torch.

    Example:
        >>> rows = measure_facts()
        >>> rows[0]["measured"]
        '0.2500'
    """
    import torch

    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)   # includes x = 0, where sigmoid' peaks
    s = torch.sigmoid(x)
    d = s * (1 - s)
    half = torch.tensor(0.5, dtype=torch.float64) ** 20
    grow = torch.tensor(1.5, dtype=torch.float64) ** 50
    at = float(x[int(d.argmax())])
    return [
        {"fact": "max of sigmoid'(x) = σ(x)(1−σ(x)) over [−8, 8]", "expected": "0.25",
         "measured": f"{float(d.max()):.4f}", "note": f"at x = {at:g}"},
        {"fact": "gradient scale after 20 layers that each multiply it by 0.5: 0.5^20", "expected": "≈ 9.5e-7",
         "measured": f"{float(half):.3g}"},
        {"fact": "gradient scale after 50 layers that each multiply it by 1.5: 1.5^50", "expected": "≈ 6.4e8",
         "measured": f"{float(grow):.3g}"},
        {"fact": "sigmoid' at x = 4 (a saturating input)", "expected": "close to 0",
         "measured": f"{float(torch.sigmoid(torch.tensor(4.0, dtype=torch.float64)) * (1 - torch.sigmoid(torch.tensor(4.0, dtype=torch.float64)))):.4f}"},
    ]


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr (hidden when disabled or stderr is not a terminal)."""
    enabled = enabled and sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def set_description(self, s: str) -> None: ...
            def close(self) -> None: ...
        return _Null()
    import shutil

    width = shutil.get_terminal_size((100, 20)).columns or 100   # 0 on some pseudo-terminals
    return tqdm(total=total, unit="step", ncols=min(max(width, 60), 120), leave=False, file=sys.stderr)


def _steps_for(group: str, cfg: DemoConfig) -> int:
    return {"depth": cfg.mlp_steps, "dead-relu": cfg.relu_steps}.get(group, cfg.rnn_steps)


def _say(msg: str, bar: Any) -> None:
    if hasattr(bar, "write") and not isinstance(bar, type) and hasattr(bar, "n"):
        bar.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)


def _diagnose(trace) -> tuple[list | None, str]:
    """Findings of one run, or ``(None, reason)`` when diagnosis is unavailable or failed."""
    try:
        from gradtrace.api import diagnose
    except ImportError as e:
        return None, f"diagnosis unavailable ({e})"
    try:
        return list(diagnose(trace)), ""
    except ImportError as e:
        return None, f"diagnosis unavailable ({e})"
    except Exception as e:  # a detector bug must not cost the user the rest of the demo
        return None, f"diagnosis failed: {type(e).__name__}: {e}"


def run_demo(out: str | Path = "gradtrace-demo", quick: bool = False, progress: bool = True,
             config: DemoConfig | None = None, only: list[str] | None = None) -> Path:
    """Run the chapter's experiments, print each run's findings with fixes, write the report.

    Writes one trace directory per run under ``out`` (each with its own ``report.html``)
    and ``out/report.html`` comparing them. ``quick`` uses smaller runs (about a minute
    on 2 CPU cores); ``config`` overrides the sizes (e.g. :data:`TINY` for tests);
    ``only`` restricts to some group ids (``"depth"``, ``"rnn-explode"``, ``"rnn-vanish"``,
    ``"dead-relu"``). Returns the path of the comparative report.

    Example:
        >>> run_demo("runs/demo", config=TINY, only=["rnn-explode"], progress=False)  # doctest: +ELLIPSIS
        gradtrace demo (test): 2 runs, 32 training steps, writing to runs/demo/
        ...
        PosixPath('runs/demo/report.html')
    """
    import torch

    import gradtrace as gt
    from gradtrace.report import report as write_report
    from gradtrace.report.html import render_comparison
    from gradtrace.report.terminal import _finding_lines

    cfg = config or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = [g for g in EXPERIMENTS if only is None or g[0] in only]
    unknown = set(only or ()) - {g[0] for g in EXPERIMENTS}
    if unknown:
        raise ValueError(f"unknown experiment group(s) {sorted(unknown)}; valid: {[g[0] for g in EXPERIMENTS]}")
    total = sum(_steps_for(g[0], cfg) * len(g[4]) for g in groups)
    mode = "test" if config is not None else ("quick" if quick else "full")
    print(f"gradtrace demo ({mode}): {sum(len(g[4]) for g in groups)} runs, {total} training steps, "
          f"writing to {out}/", flush=True)

    facts = measure_facts()
    print("\nThe chapter's numbers, measured with torch:")
    for f in facts:
        print(f"  {f['fact']}: {f['measured']} (chapter: {f['expected']})")

    threads = torch.get_num_threads()
    # These models are small: one thread avoids the cost of waking (and, on a busy
    # machine, waiting for) a thread pool on every tiny kernel, often 10x faster here.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)       # tiny gradients are the point here; keep them fast
    bar = _progress(total, progress)
    started = time.perf_counter()
    page_groups = []
    traces: dict[str, Any] = {}
    try:
        for gid, title, text, charts, runs in groups:
            _say(f"\n== {title} ==", bar)
            page_runs = []
            for name, label, trainer, note in runs:
                bar.set_description(name)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")    # nan runs warn by design
                    trainer(str(out / name), cfg, lambda: bar.update(1))
                    trace = gt.load(out / name)
                secs = time.perf_counter() - t0
                traces[name] = trace
                findings, why = _diagnose(trace)
                write_report(trace, out / name / "report.html", findings=findings, title=f"{label} ({name})")
                summary = _run_line(trace)
                _say(f"\n-- {label} [{name}] · {secs:.1f} s · {summary}", bar)
                if why:
                    _say(f"   {why}", bar)
                else:
                    for _, line in _finding_lines(findings):
                        _say("  " + line, bar)
                page_runs.append({"name": name, "label": label, "trace": trace, "findings": findings,
                                  "href": f"{name}/report.html", "note": (note + " " + summary).strip()})
            page_groups.append({"id": gid, "title": title, "text": text, "charts": charts, "runs": page_runs})
    finally:
        bar.close()
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    facts += _measured_from_runs(traces)
    elapsed = time.perf_counter() - started
    page = render_comparison(
        page_groups, title="gradtrace demo: vanishing and exploding gradients",
        intro=(f"Seeded CPU runs on synthetic data ({mode} configuration, {total} training steps, "
               f"{elapsed:.0f} s). Each group compares a failing setup with its fixes; every run links to "
               "its full report."),
        facts=facts)
    index = out / "report.html"
    index.write_text(page, encoding="utf-8")
    print(f"\nDone in {elapsed:.0f} s. Report: {index.resolve()}")
    print(f"Open it in a browser, or inspect a run with: gradtrace show {out / groups[0][4][0][0]}" if groups else "")
    return index


def _run_line(trace) -> str:
    import math

    from gradtrace.report import summarize
    from gradtrace.report.plots import fmt

    s = summarize(trace)
    parts = []
    if s["first_loss"] is not None:
        last = s["final_loss"]
        lv = trace.series("loss")
        if lv.size and not math.isfinite(float(lv[-1])):
            last = "nan"
        parts.append(f"loss {fmt(s['first_loss'])} → {last if isinstance(last, str) else fmt(last)}")
    if s["max_total_grad_norm"] is not None:
        m = s["max_total_grad_norm"]
        parts.append(f"max grad norm {m if isinstance(m, str) else fmt(m)}")
    if s["nonfinite_events"]:
        parts.append(f"{s['nonfinite_events']} steps with nan/inf")
    return " · ".join(parts)


def _measured_from_runs(traces: dict[str, Any]) -> list[dict[str, str]]:
    """Facts read back from the runs: the depth and time decay the chapter predicts."""
    import numpy as np

    from gradtrace.report import plots

    rows = []
    sig = traces.get("sigmoid")
    if sig is not None:
        flow = plots.gradient_flow(sig)
        m = flow["mean"]
        if len(m) > 1 and np.isfinite(m[0]) and np.isfinite(m[-1]) and m[-1] > 0:
            rows.append({"fact": f"deep sigmoid run: gradient norm of the first layer / last layer "
                                 f"({len(m)} layers, mean over steps)",
                         "expected": "tiny (vanishing)", "measured": plots.fmt(m[0] / m[-1])})
    van = traces.get("rnn_vanishing")
    if van is not None:
        for name, v in plots.time_gradients(van).items():
            if v.shape[1] > 1 and v[0, -1] > 0:
                rows.append({"fact": "tanh RNN (radius 0.5): gradient at time step 0 / last step, first step",
                             "expected": f"≈ 0.5^{v.shape[1] - 1} = {plots.fmt(0.5 ** (v.shape[1] - 1))} or smaller",
                             "measured": plots.fmt(v[0, 0] / v[0, -1])})
    exp = traces.get("rnn_exploding")
    if exp is not None:
        for name, v in plots.time_gradients(exp).items():
            if v.shape[1] > 1 and v[0, -1] > 0 and np.isfinite(v[0, 0]):
                rows.append({"fact": "ReLU RNN (radius 1.6): gradient at time step 0 / last step, first step",
                             "expected": "huge (exploding)", "measured": plots.fmt(v[0, 0] / v[0, -1])})
    return rows
