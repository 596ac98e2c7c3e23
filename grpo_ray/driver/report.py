"""`grpo-ray report RUN_DIR`: one self-contained HTML page of a run (run_dir/report.html): the
config keys that differ from the defaults, the evaluation table (start, best, end per metric,
retention sets marked), every chart (embedded as data: URIs, so the page needs no network and
no other file), the warnings and events in order, and a few spot-check samples from the start
and the end. Every run writes it at its end, after the plots."""
from __future__ import annotations

import base64
import glob
import html
import json
import os

from .outputs import write_atomic


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(cfg: dict) -> list[tuple[str, object, object]]:
    """(key, value, default) of every key of a run's config (its config.yaml, parsed) that
    differs from the default."""
    from ..config import Config

    ran = _flat(cfg)
    default = _flat(Config().to_dict())
    return [(k, v, default.get(k)) for k, v in ran.items() if v != default.get(k)]


def _rows(run_dir: str) -> list[dict]:
    rows = []
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a partial line (a crash mid-write): plots.load_metrics says so
    return rows


def eval_table(rows: list[dict], retention: set[str]) -> list[list[str]]:
    """[metric, start, best (at step), end, retention] for every eval metric logged."""
    evals = [r for r in rows if "event" not in r and any(k.startswith("eval/") for k in r)]
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    table = []
    for k in keys:
        seen = [(r["step"], r[k]) for r in evals if isinstance(r.get(k), (int, float))]
        if not seen:
            continue
        step, best = max(seen, key=lambda s: s[1])
        kept = next((name for name in retention if k.startswith(f"eval/{name}/")), None)
        table.append([k, f"{seen[0][1]:.3f}", f"{best:.3f} (step {step})", f"{seen[-1][1]:.3f}",
                      "retention" if kept else ""])
    return table


def _samples(run_dir: str, n: int = 4) -> list[tuple[str, list[dict]]]:
    files = sorted(glob.glob(os.path.join(run_dir, "samples", "step_*.jsonl")))
    picked = files[:1] + files[-1:] if len(files) > 1 else files
    return [(os.path.basename(p)[:-6], [json.loads(line) for line in open(p)][:n]) for p in picked]


def _table(head: list[str], rows: list[list]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def _image(path: str) -> str:
    data = base64.b64encode(open(path, "rb").read()).decode()
    return f'<figure><img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}"></figure>'


def write_report(run_dir: str) -> str:
    """Write run_dir/report.html (atomically) and return its path."""
    import yaml

    rows = _rows(run_dir)
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f) or {}
    else:
        cfg = {}
    retention = {s["name"] for s in (cfg.get("eval") or {}).get("sets", []) if s.get("retention")}
    events = [[r.get("step", ""), r["event"], r.get("message", "")] for r in rows if "event" in r]
    parts = [f"<h1>grpo-ray run: {html.escape(os.path.basename(os.path.abspath(run_dir)))}</h1>",
             "<h2>Config (keys that differ from the defaults)</h2>",
             _table(["key", "value", "default"], [list(c) for c in config_changes(cfg)]),
             "<h2>Evaluation</h2>", _table(["metric", "start", "best", "end", ""], eval_table(rows, retention)),
             "<h2>Charts</h2>", *[_image(p) for p in sorted(glob.glob(os.path.join(run_dir, "plots", "*.png")))],
             "<h2>Warnings and events</h2>", _table(["step", "event", "message"], events)]
    for name, samples in _samples(run_dir):
        parts += [f"<h2>Samples: {html.escape(name)}</h2>",
                  _table(["prompt", "response", "reward", "reason"],
                         [[s.get("prompt"), s.get("response"), s.get("reward"), s.get("reason")] for s in samples])]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;white-space:pre-wrap;vertical-align:top}"
             "img{max-width:100%}")
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    path = os.path.join(run_dir, "report.html")
    write_atomic(path, page)
    return path


def plots_and_report(run_dir: str, kl_stop: float | None, log, timeline) -> None:
    """The end of every run: the charts, then the report that embeds them. A failure is a
    warning (the run is saved; `grpo-ray plot` / `grpo-ray report` draw them again)."""
    from ..data.datasets import DataError
    from .plots import plot_run

    try:
        with timeline.phase("plots"):
            charts = plot_run(run_dir, kl_stop)
        log(f"plots: {len(charts)} charts in {os.path.join(run_dir, 'plots')}")
    except DataError as e:  # nothing to plot (no step ran): the run itself is fine
        log(f"warning: no plots: {e}")
        return
    except Exception as e:  # noqa: BLE001 - a chart that fails must not fail a saved run
        log(f"warning: the plots failed ({type(e).__name__}: {e}); `grpo-ray plot {run_dir}` draws them again")
    try:
        log(f"report: {write_report(run_dir)}")
    except Exception as e:  # noqa: BLE001
        log(f"warning: the report failed ({type(e).__name__}: {e}); `grpo-ray report {run_dir}` writes it again")
